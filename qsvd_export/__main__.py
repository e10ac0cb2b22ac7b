from qsvd_export.cli import main

raise SystemExit(main())
