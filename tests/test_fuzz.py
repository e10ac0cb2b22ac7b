"""Property-based robustness: corrupted ONNX files get a clean one-line error (or, when the damage happens
to leave a valid graph, a normal run), never an internal error or a partial output."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsvd_export.cli import main

CLEAN_EXITS = {0, 3, 4}  # done, bad input, unsupported model

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("splice"), st.floats(0.0, 0.999), st.binary(min_size=1, max_size=64)),
)


def _mutate(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return data[: int(mutation[1] * len(data))]
    if kind == "flip":
        out = bytearray(data)
        for where, value in mutation[1]:
            out[int(where * len(out))] = value
        return bytes(out)
    start = int(mutation[1] * len(data))
    return data[:start] + mutation[2] + data[start + len(mutation[2]):]


@pytest.fixture(scope="module")
def source(bundles):
    return bundles.dense("llama")


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=mutations, target=st.sampled_from(["model.onnx", "model.onnx.data"]))
def test_corrupted_graph_or_weights_fail_cleanly(source, tmp_path_factory, mutation, target):
    work = tmp_path_factory.mktemp("fuzz")
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(source / name, work / name)
    (work / target).write_bytes(_mutate((work / target).read_bytes(), mutation))
    out = work / "out"
    code = main([str(work / "model.onnx"), "-o", str(out), "-q"])
    assert code in CLEAN_EXITS, (mutation, target, code)
    assert out.exists() == (code == 0)
    assert [p.name for p in work.iterdir() if p.name.startswith(".out")] == []  # no temporary folder left
