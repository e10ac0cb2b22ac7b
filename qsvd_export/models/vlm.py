"""Vision-language models (SmolVLM = Idefics3) as three torch modules, one per exported graph.

A VLM bundle chains three graphs (DESIGN.md §6, ``qsvd_config.json["vlm"]``):

- ``vision``: ``pixel_values`` float32 [frames, 3, S, S] → ``image_features`` [frames, image_seq_len, H]
  (SigLIP encoder + pixel-shuffle connector; S = the vision config's ``image_size``, every frame full,
  as the Idefics3 processor's tiles and global image are);
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

VLM_TYPES = ("idefics3",)


class VisionFeatures(nn.Module):
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
    vision: VisionFeatures
    embed: TokenEmbedding
    decoder: EmbeddingsCausalLM
    image_token_id: int
    image_seq_len: int
    image_size: int
    text_config: Any
    vision_config: Any


def vlm_parts(model: nn.Module) -> VlmParts:
    """The three exported pieces of an ``Idefics3ForConditionalGeneration`` (shared parameters)."""
    config = model.config
    if getattr(config, "model_type", None) not in VLM_TYPES:
        raise UnsupportedModelError(f"model_type '{getattr(config, 'model_type', None)}' is not a supported VLM "
                                    f"(supported: {', '.join(VLM_TYPES)})")
    body = model.model
    return VlmParts(
        vision=VisionFeatures(body.vision_model, body.connector),
        embed=TokenEmbedding(body.text_model.get_input_embeddings()),
        decoder=EmbeddingsCausalLM(body.text_model, model.lm_head),
        image_token_id=int(config.image_token_id),
        image_seq_len=int(body.image_seq_len),
        image_size=int(config.vision_config.image_size),
        text_config=config.text_config,
        vision_config=config.vision_config,
    )


def merge_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """``inputs_embeds`` [B, T, H] with the image-token rows replaced by ``features`` [frames, S, H] in order."""
    mask = (input_ids == image_token_id).unsqueeze(-1)
    count = int(mask.sum())
    if count != features.shape[0] * features.shape[1]:
        raise ValueError(f"{count} image tokens for {features.shape[0]} frames × {features.shape[1]} features")
    return inputs_embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype))
