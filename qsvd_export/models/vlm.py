"""Vision-language models (SmolVLM = Idefics3, LLaVA) as three torch modules, one per exported graph.

A VLM bundle chains three graphs (DESIGN.md §6, ``qsvd_config.json["vlm"]``):

- ``vision``: ``pixel_values`` float32 [frames, 3, S, S] → ``image_features`` [frames, image_seq_len, H]
  (Idefics3: SigLIP encoder + pixel-shuffle connector, every frame full as the processor's tiles and
  global image are; LLaVA: the CLIP tower's selected layer + projector, one frame per image;
  S = the vision config's ``image_size``);
- ``embed``: ``input_ids`` int64 [batch, seq] → ``inputs_embeds`` [batch, seq, H];
- ``model`` (the decoder): ``inputs_embeds`` + ``attention_mask`` + ``position_ids`` + cache → ``logits`` +
  present cache, the decoder contract of :mod:`qsvd_export.export` with embeddings in place of ids.

The runner writes frame f's features over the f-th block of ``image_seq_len`` image tokens
(``image_token_id``) in the embeddings, as ``Idefics3Model.inputs_merger`` does.
The three modules share the model's parameters (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from qsvd_export.errors import UnsupportedModelError

VLM_TYPES = ("idefics3", "llava")


class Idefics3Features(nn.Module):
    """pixel_values [frames, C, S, S] → connector features [frames, image_seq_len, text hidden].

    Equal to ``Idefics3Model.get_image_features`` for full (unpadded) S×S frames: the patch position ids are
    then 0…P-1 in order, so the variable-resolution bucketing of ``Idefics3VisionEmbeddings`` reduces to the
    position table itself (no ``bucketize`` in the graph)."""

    def __init__(self, vision_model: nn.Module, connector: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.connector = connector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.vision_model.embeddings
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        hidden = patches + embeddings.position_embedding.weight[None, : patches.shape[1]]
        hidden = self.vision_model.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.connector(self.vision_model.post_layernorm(hidden))


class LlavaFeatures(nn.Module):
    """pixel_values [images, C, S, S] → projected features [images, image_seq_len, text hidden]: the vision
    tower's ``vision_feature_layer`` hidden states (CLS dropped with the ``default`` strategy) through the
    multimodal projector: ``LlavaModel.get_image_features`` without its per-image list (which would unroll
    the frame axis in the graph)."""

    def __init__(self, body: nn.Module, feature_layer: Any, strategy: str) -> None:
        super().__init__()
        self.body = body
        self.feature_layer = feature_layer
        self.strategy = strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.body.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [states[i][:, 1:] if self.strategy == "default" else states[i] for i in layers]
        return self.body.multi_modal_projector(torch.cat(selected, dim=-1))


class TokenEmbedding(nn.Module):
    """input_ids [batch, seq] → inputs_embeds [batch, seq, H]."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


class EmbeddingsCausalLM(nn.Module):
    """The language model over ``inputs_embeds``: text body + LM head. ``config`` is the text config, so the
    decoder export and cache layout treat it like any causal LM of that family."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model
        self.lm_head = lm_head
        self.config = text_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor, cache: Any,
                use_cache: bool = True) -> Any:
        out = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache)
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state), cache=out.cache)


@dataclass
class VlmParts:
    vision: nn.Module
    embed: TokenEmbedding
    decoder: EmbeddingsCausalLM
    image_token_id: int
    image_seq_len: int
    image_size: int
    text_config: Any
    vision_config: Any


def vlm_parts(model: nn.Module) -> VlmParts:
    """The three exported pieces of an ``Idefics3ForConditionalGeneration`` or
    ``LlavaForConditionalGeneration`` (shared parameters)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in VLM_TYPES:
        raise UnsupportedModelError(f"model_type '{model_type}' is not a supported VLM (supported: {', '.join(VLM_TYPES)})")
    body = model.model
    vision_config = config.vision_config
    patches = (int(vision_config.image_size) // int(vision_config.patch_size)) ** 2
    if model_type == "idefics3":
        vision: nn.Module = Idefics3Features(body.vision_model, body.connector)
        text_model, image_seq_len = body.text_model, int(body.image_seq_len)
    else:
        strategy = str(config.vision_feature_select_strategy)
        if strategy not in ("default", "full"):
            raise UnsupportedModelError(f"llava vision_feature_select_strategy '{strategy}' (default or full)")
        vision = LlavaFeatures(body, config.vision_feature_layer, strategy)
        text_model, image_seq_len = body.language_model, patches + (strategy == "full")
    return VlmParts(
        vision=vision,
        embed=TokenEmbedding(model.get_input_embeddings()),
        decoder=EmbeddingsCausalLM(text_model, model.lm_head),
        image_token_id=int(config.image_token_id),
        image_seq_len=image_seq_len,
        image_size=int(vision_config.image_size),
        text_config=config.text_config,
        vision_config=vision_config,
    )


def unused_vision_layers(model: nn.Module) -> list[str]:
    """Module paths of vision encoder layers no image feature reads (LLaVA's ``vision_feature_layer`` = -2
    leaves the last CLIP layer unused): their attention has no gradient and no node in the vision graph."""
    config = model.config
    if getattr(config, "model_type", None) != "llava":
        return []
    feature_layers = config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    tower = model.model.vision_tower
    stacks = [(path, module) for path, module in tower.named_modules()
              if isinstance(module, nn.ModuleList) and path.endswith("encoder.layers")]
    if len(stacks) != 1:
        raise UnsupportedModelError(f"{type(tower).__name__}: cannot find its encoder layer stack")
    path, layers = stacks[0]
    states = len(layers) + 1  # hidden_states: the embeddings, then one per layer
    last_read = max(i % states for i in feature_layers)  # hidden_states[j + 1] is layer j's output
    tower_path = next(p for p, m in model.named_modules() if m is tower)
    return [f"{tower_path}.{path}.{j}" for j in range(last_read, len(layers))]

