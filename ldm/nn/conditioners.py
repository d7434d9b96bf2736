"""Conditioners: map a batch to backbone conditioning dict(context=[B, L, D] | None, y=[B, D] | None).

Each conditioner also gives `null(batch_size)`, the condition of the unconditional branch used by
classifier-free guidance (empty caption, null class), and `dims` to wire the backbone's
context_dim / y_dim.
"""

import os
import socket
from urllib.parse import urlparse

import huggingface_hub.constants
import open_clip
import torch
from einops import rearrange
from open_clip.factory import load_state_dict
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import Tensor, nn

from ldm.nn.attention import TransformerBlock
from ldm.nn.embeddings import LabelEmbedding

Cond = dict[str, Tensor | None]


class Conditioner(nn.Module):
    """Base class: encode(batch) and null(batch_size) -> dict(context, y); forward is encode."""

    context_dim: int | None = None
    y_dim: int | None = None

    @property
    def dims(self) -> dict[str, int | None]:
        """Backbone wiring: dict(context_dim=..., y_dim=...), None where this conditioner gives nothing."""
        return {"context_dim": self.context_dim, "y_dim": self.y_dim}

    def encode(self, batch: dict) -> Cond:
        raise NotImplementedError

    def null(self, batch_size: int) -> Cond:
        raise NotImplementedError

    def null_like(self, cond: Cond, batch_size: int) -> Cond:
        """The unconditional branch paired with `cond` (guidance dropout and sampling): `null(batch_size)`; a
        conditioner that keeps part of the condition in both branches (an image under concatenation) overrides it."""
        return self.null(batch_size)

    def forward(self, batch: dict) -> Cond:
        """The batch's condition, `encode(batch)` (guidance dropout is ldm.diffusion.guidance.cfg_dropout)."""
        return self.encode(batch)


def repeat_rows(cond: Cond, batch_size: int) -> Cond:
    """A one-row condition as a batch: an expanded view, so the null caption is encoded once per call instead of
    once per sample (gradients of the shared row still sum over the batch)."""
    return {k: None if v is None else v.expand(batch_size, *v.shape[1:]) for k, v in cond.items()}


def _captions(batch: dict) -> list[str]:
    captions = batch.get("caption")
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"text conditioning needs batch['caption'] as a list of str, got {type(captions).__name__}")
    return list(captions)


class Unconditional(Conditioner):
    """No conditioning: context and y are None."""

    def encode(self, batch: dict) -> Cond:
        return {"context": None, "y": None}

    def null(self, batch_size: int) -> Cond:
        return {"context": None, "y": None}


class ClassConditioner(Conditioner):
    """Learned class embedding y [B, dim] with an extra null class (DiT); optionally also as one context token."""

    def __init__(self, num_classes: int, dim: int, as_context: bool = False):
        super().__init__()
        self.embedding = LabelEmbedding(num_classes, dim)
        self.as_context = as_context
        self.y_dim = dim
        self.context_dim = dim if as_context else None

    def _embed(self, labels: Tensor) -> Cond:
        y = self.embedding(labels)  # [B, dim]
        return {"context": rearrange(y, "b d -> b 1 d") if self.as_context else None, "y": y}

    def encode(self, batch: dict) -> Cond:
        labels = torch.as_tensor(batch["label"])
        num_classes = self.embedding.num_classes
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"batch['label'] must lie in [0, {num_classes}) for class conditioning, got range "
                f"[{labels.min().item()}, {labels.max().item()}] (-1 means the dataset has no labels)"
            )
        return self._embed(labels)

    def null(self, batch_size: int) -> Cond:
        device = self.embedding.table.weight.device
        return self._embed(torch.full((batch_size,), self.embedding.null_index, dtype=torch.long, device=device))


def vocabulary_rows(tokenizer: SimpleTokenizer, vocabulary: list[str] | None) -> Tensor:
    """Token table row of every BPE id, LongTensor [49408]: the identity without a vocabulary; else the start, end and
    padding tokens and the words' tokens numbered in id order, -1 elsewhere."""
    size = len(tokenizer.encoder)
    if vocabulary is None:
        return torch.arange(size)
    if isinstance(vocabulary, str) or not vocabulary or not all(isinstance(w, str) and w.strip() for w in vocabulary):
        raise ValueError(f"model.conditioner.vocabulary must be null or a list of words, got {vocabulary!r}")
    kept = {0, tokenizer.sot_token_id, tokenizer.eot_token_id}  # 0 pads every caption
    kept.update(token for word in vocabulary for token in tokenizer.encode(word))
    rows = torch.full((size,), -1, dtype=torch.long)
    ids = torch.tensor(sorted(kept))
    rows[ids] = torch.arange(len(ids))
    return rows


class TextTransformerConditioner(Conditioner):
    """Text encoder trained jointly with the diffusion model (LDM text-to-image, Rombach et al. 2022, Sec. 4.3):
    CLIP BPE tokens -> causal transformer -> tokens [B, context_length, width]; y = EOT token if pooled.

    `vocabulary` (words) keeps only their BPE tokens' rows of the token table: a closed grammar such as the built-in
    shapes' 20 words needs 23 rows, not 49,408 (most of a small model's parameters); a caption
    with any other token is refused.
    """

    def __init__(
        self,
        width: int = 512,
        layers: int = 4,
        heads: int = 8,
        context_length: int = 77,
        pooled: bool = False,
        vocabulary: list[str] | None = None,
    ):
        super().__init__()
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        # rows[bpe id] = row of the token table, -1 for tokens outside `vocabulary` (all 49,408 rows when None); kept
        # on the CPU with the tokenizer, so unknown words are found without a device sync
        self.rows = vocabulary_rows(self.tokenizer, vocabulary)
        self.token_embedding = nn.Embedding(int(self.rows.max()) + 1, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        # Causal (CLIP-style): padding never changes caption tokens, and the EOT token has seen the whole caption.
        mask = torch.ones(context_length, context_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.pooled = pooled
        self.context_dim = width
        self.y_dim = width if pooled else None

    def _encode_captions(self, captions: list[str]) -> Cond:
        tokens = self.tokenizer(captions)  # [B, L] BPE ids, on the CPU
        rows = self.rows[tokens]
        if bool((rows < 0).any()):
            unknown = sorted({self.tokenizer.decode([int(t)]).strip() for t in tokens[rows < 0]})
            raise ValueError(f"caption words outside model.conditioner.vocabulary: {unknown} (add them, or set "
                             f"model.conditioner.vocabulary=null for all 49,408 tokens; a new table, so a new run)")
        rows = rows.to(self.token_embedding.weight.device)
        x = self.token_embedding(rows) + self.positional_embedding
        for block in self.blocks:
            x = block(x, mask=self.causal_mask)
        x = self.ln_final(x)  # [B, L, width]
        # The end-of-text token has the largest id and so the largest row: argmax finds it in every caption.
        y = x[torch.arange(x.shape[0], device=x.device), rows.argmax(dim=-1)] if self.pooled else None
        return {"context": x, "y": y}

    def encode(self, batch: dict) -> Cond:
        return self._encode_captions(_captions(batch))

    def null(self, batch_size: int) -> Cond:
        return repeat_rows(self._encode_captions([""]), batch_size)


def _reachable(host: str, timeout_s: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def resolve_open_clip_weights(model_name: str, pretrained: str) -> str:
    """Local path of open_clip weights given a file or a hub tag (downloaded, or from the cache); fails fast offline."""
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(
            f"model.conditioner.pretrained={pretrained!r} is neither an existing file nor an open_clip tag of "
            f"{model_name} (tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
        )
    hint = (
        f"set model.conditioner.pretrained to a local weights file (e.g. open_clip_pytorch_model.bin for "
        f"{model_name}/{pretrained}, copied from a machine with internet)"
    )
    from_hf = bool(cfg.get("hf_hub"))
    # With HF_HUB_OFFLINE the hub reads only its local cache, which fails at once when the file is absent.
    if not (from_hf and huggingface_hub.constants.HF_HUB_OFFLINE):
        host = urlparse(huggingface_hub.constants.ENDPOINT if from_hf else cfg["url"]).hostname
        if not _reachable(host):
            raise RuntimeError(
                f"cannot download open_clip weights {model_name}/{pretrained}: {host} is unreachable (offline?). {hint}"
            )
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:
        raise RuntimeError(f"could not fetch open_clip weights {model_name}/{pretrained}: {e}. {hint}") from e


# open_clip TextTransformer sizes a text_cfg may set (its other options change the maths, so they are refused).
TEXT_TOWER_SIZES = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
_ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}  # erf GELU; x * sigmoid(1.702 x) (OpenAI CLIP)


def _bare_text_tower(text_cfg: dict, activation: str | None) -> TextTransformer:
    unknown = sorted(set(text_cfg) - set(TEXT_TOWER_SIZES))
    if unknown:
        raise ValueError(f"model.conditioner.text_cfg: unknown keys {unknown} (allowed: {list(TEXT_TOWER_SIZES)})")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"model.conditioner.activation must be one of {list(_ACTIVATIONS)} with text_cfg, "
                         f"got {activation!r}")
    # No projection and no logit scale: a conditioner uses the tokens, and a tower built from sizes alone has no
    # source for these tensors (an imported CLIPTextModel has none), so they are not invented.
    return TextTransformer(**text_cfg, output_dim=None, proj_type="none", pool_type="argmax",
                           act_layer=_ACTIVATIONS[activation])


class OpenCLIPTextConditioner(Conditioner):
    """Frozen open_clip text tower; context = layer-normed tokens of the last or penultimate layer.

    The tower is an open_clip model by name (`model_name`, its text part; text_projection and logit_scale
    included), or sizes alone (`text_cfg`, keys TEXT_TOWER_SIZES, with `activation`): a bare TextTransformer
    without projection, which expresses any transformers CLIPTextModel. pretrained: an open_clip tag (downloaded
    on first use, model_name only), a local weights file (a full CLIP checkpoint or a text-only state dict), or
    None for random weights (tests, imports). Captions are padded after the end-of-text token with
    `pad_token_id`: 0 as open_clip and SD 2.x do, 49407 (end-of-text) for SD 1.x's CLIP tokenizer; padding
    changes the context at padded positions, which the backbone attends to. y = pooled embedding if pooled
    (projected where the tower has a projection).
    """

    def __init__(
        self,
        model_name: str | None = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        layer: str = "penultimate",
        pooled: bool = False,
        text_cfg: dict | None = None,
        activation: str | None = None,
        pad_token_id: int = 0,
    ):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if (model_name is None) == (text_cfg is None):
            raise ValueError("give exactly one of model.conditioner.model_name and model.conditioner.text_cfg, "
                             f"got model_name={model_name!r}, text_cfg={text_cfg!r}")
        if text_cfg is not None:
            if pretrained is not None and not os.path.isfile(pretrained):
                raise ValueError(f"model.conditioner.pretrained={pretrained!r}: with text_cfg it must be a local "
                                 "weights file or null")
            model = _bare_text_tower(dict(text_cfg), activation)
            self.tokenizer = SimpleTokenizer(context_length=model.context_length)
            name = "text_cfg"
            weights = pretrained
        else:
            if activation is not None:
                raise ValueError(f"model.conditioner.activation={activation!r} applies to text_cfg towers; the "
                                 f"open_clip config of {model_name} fixes it (set it to null)")
            weights = resolve_open_clip_weights(model_name, pretrained) if pretrained is not None else None
            model = open_clip.create_model(model_name, pretrained=None)
            del model.visual  # only the text tower is used; dropping the image tower saves most of the memory
            self.tokenizer = open_clip.get_tokenizer(model_name)
            name = model_name
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text, CLIP inline
        if not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None:
            raise ValueError(f"{name}: only open_clip's causal text transformer towers are supported")
        if not tower.transformer.batch_first:
            raise ValueError(f"{name}: open_clip text transformer must be batch-first")
        if pad_token_id != 0 and not hasattr(self.tokenizer, "eot_token_id"):
            raise ValueError(f"model.conditioner.pad_token_id={pad_token_id}: {name}'s tokenizer has no end-of-text "
                             "token to pad after")
        if weights is not None:
            self._load_text_weights(model, weights, name)
        model.requires_grad_(False)
        self.model = model.eval()
        self.layer = layer
        self.pooled = pooled
        self.pad_token_id = pad_token_id
        self.context_dim = tower.transformer.width
        self.y_dim = self._pool(self._tokenize([""])).shape[-1] if pooled else None

    @staticmethod
    def _load_text_weights(model: nn.Module, path: str, model_name: str) -> None:
        state = {k: v for k, v in load_state_dict(path).items() if not k.startswith("visual.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # missing, unexpected or mis-shaped keys
            raise ValueError(
                f"weights in {path} (model.conditioner.pretrained) do not fit the open_clip {model_name} text "
                f"tower (model.conditioner.model_name): {e}"
            ) from e

    def train(self, mode: bool = True) -> "OpenCLIPTextConditioner":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever the surrounding module's mode
        return self

    def _tokenize(self, captions: list[str]) -> Tensor:
        tokens = self.tokenizer(captions)  # [B, L]: start, caption, end-of-text, zeros
        if self.pad_token_id != 0:
            # "!" has id 0 too, so only what follows the first end-of-text token is padding.
            eot = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=-1, keepdim=True)  # [B, 1]
            after = torch.arange(tokens.shape[1]) > eot  # [B, L]
            tokens = tokens.masked_fill(after, self.pad_token_id)
        return tokens

    @torch.no_grad()
    def _pool(self, tokens: Tensor) -> Tensor:
        encode = getattr(self.model, "encode_text", self.model)  # a CLIP model, or a bare tower that pools itself
        return encode(tokens.to(self._device()))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _encode_captions(self, captions: list[str]) -> Cond:
        tower = getattr(self.model, "text", self.model)
        tokens = self._tokenize(captions).to(self._device())  # [B, L]
        x = tower.token_embedding(tokens) + tower.positional_embedding
        blocks = tower.transformer.resblocks
        stop = len(blocks) - 1 if self.layer == "penultimate" else len(blocks)
        for block in blocks[:stop]:
            x = block(x, attn_mask=tower.attn_mask)
        context = tower.ln_final(x)  # [B, L, width]
        return {"context": context, "y": self._pool(tokens) if self.pooled else None}

    def encode(self, batch: dict) -> Cond:
        return self._encode_captions(_captions(batch))

    def null(self, batch_size: int) -> Cond:
        return repeat_rows(self._encode_captions([""]), batch_size)
