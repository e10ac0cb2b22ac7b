"""Tiny random configs of each supported family, for fast structural and parity tests.

Random weights have flat spectra: they prove structure and numerical parity, never compression quality.
"""

from __future__ import annotations

from typing import Any, Callable

from qsvd_export.errors import UsageError

_VOCAB = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids (the tiny vocab is 256): lets tiny models calibrate and evaluate on text."""

    chat_template = None
    eos_token_id = None
    cls_token_id = None
    sep_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False, **_: object) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
    )


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2
    )


def _bert() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128,
    )


def _vit() -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, num_channels=3,
    )


def _dinov2() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=64, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, num_channels=3,
    )


_VLM_SPECIALS = ["<|endoftext|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                 *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]


def _vlm_tokenizer() -> Any:
    """A byte-level fast tokenizer: 256 byte tokens, then the Idefics3 special tokens (``<image>`` = 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_VLM_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _vlm_processor(family: str) -> Any:
    """The family's real processor over :func:`_vlm_tokenizer`, for 32-pixel frames. Idefics3: images split
    into 2 × 2 tiles of one frame each plus the global frame (64-pixel longest edge); LLaVA: one
    center-cropped frame, 16 image tokens."""
    if family == "idefics3":
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                           do_image_splitting=True)
        return Idefics3Processor(image_processor=images, tokenizer=_vlm_tokenizer(), image_seq_len=4)
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=_vlm_tokenizer(), patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


_VLM_TEXT = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=False, eos_token_id=256, bos_token_id=256, pad_token_id=256)


def _idefics3() -> Any:
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(_VLM_TEXT), scale_factor=2, image_token_id=258, tie_word_embeddings=False,
    )


def _llava() -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           projection_dim=32),
        text_config=dict(_VLM_TEXT), image_token_id=258, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
    "bert": _bert,
    "vit": _vit,
    "dinov2": _dinov2,
    "idefics3": _idefics3,
    "llava": _llava,
}


def build_tiny(family: str, seed: int = 0):
    """Build ``tiny-<family>`` with deterministic random weights (seeded), eval mode, fp32."""
    import torch

    from qsvd_export.models import adapter_for_config
    from qsvd_export.loaded import LoadedModel

    if family not in TINY_CONFIGS:
        raise UsageError(f"unknown tiny family '{family}' (known: {', '.join(sorted(TINY_CONFIGS))})")
    config = TINY_CONFIGS[family]()
    config._attn_implementation = "eager"
    adapter = adapter_for_config(config)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = adapter.model_class().from_config(config, dtype=torch.float32, attn_implementation="eager")
        # Random init of tiny models is near-degenerate (zero biases, unit norms); perturb so parity tests
        # exercise every parameter.
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    processor = _vlm_processor(family) if adapter.kind == "vlm" else None
    if processor is not None:
        tokenizer = processor.tokenizer
        if tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
            raise AssertionError(f"tiny {family}: image token id out of step with the tokenizer")
    else:
        tokenizer = ByteTokenizer() if adapter.kind != "vision" else None
    return LoadedModel(name=f"tiny-{family}", model=model, tokenizer=tokenizer, kind=adapter.kind,
                       source={"tiny": family, "seed": seed}, processor=processor)
