"""Stable Diffusion's CLIP text encoders <-> our OpenCLIPTextConditioner: configs, tensor names, tokenizer files.

Both sides compute the same thing: a pre-LayerNorm causal transformer whose context is the final LayerNorm of one
block's tokens. transformers' CLIPTextModel keeps q, k, v as three linear layers where open_clip fuses them into
in_proj (q; k; v along dim 0), and calls the rest by other names.

- SD 1.x: CLIP ViT-L/14's text model (quick_gelu, 12 layers, width 768), context = last_hidden_state; its
  tokenizer pads with <|endoftext|> (49407). Single files keep it in transformers names under
  "cond_stage_model.transformer." and carry no config (SD1_TEXT_CONFIG holds it).
- SD 2.x: OpenCLIP ViT-H/14 (gelu, 24 layers, width 1024), context = ln_final of the penultimate block's tokens;
  its tokenizer pads with "!" (id 0, as open_clip does). Single files keep the open_clip model under
  "cond_stage_model.model." (24 blocks, text_projection, logit_scale); diffusers folders keep a 23-layer
  CLIPTextModel (diffusers' conversion drops block 24 and the projection) whose last_hidden_state is that context.

How SD 2.x imports: a diffusers folder gives a bare 23-block tower read at "last"
(text_encoder_from_transformers_config); a single file gives the ViT-H-14 open_clip model read at "penultimate"
with every tensor kept (open_clip_text_encoder), so it exports back unchanged. Both give the same context. Exported
as a CLIPTextModel, the second drops the tensors `not_in_transformers` lists: none of them reaches the context.

Tokenizers: our conditioner tokenizes with open_clip (ftfy fixes, HTML unescaping), as SD's original code did.
transformers' CLIPTokenizer (>= 5, so diffusers) normalises only Unicode NFC, whitespace and case, and matches
special tokens inside captions: with SD 2.x's pad token "!", every "!" of a caption becomes id 0 there instead
of open_clip's "!</w>" (256). Captions without "!" (under that pad token), HTML entities or what ftfy rewrites
(curly quotes, ligatures, full-width forms) get identical ids.
"""

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor

from ldm.interop.files import read_json
from ldm.interop.keymap import KeyMap, key, prefixed, to_theirs
from ldm.interop.settings import our_args, read_settings
from ldm.nn.conditioners import TEXT_TOWER_SIZES, OpenCLIPTextConditioner
from ldm.utils.atomic import atomic_write_json, atomic_write_text
from ldm.utils.errors import ConfigError

LAYOUTS = ("transformers", "open_clip")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # CLIP's special tokens as transformers spells them (ids 49406, 49407)
SD1_PAD_TOKEN_ID = 49407  # SD 1.x pads with <|endoftext|>; SD 2.x with "!" (0)
SD2_OPEN_CLIP_MODEL = "ViT-H-14"
# CLIP ViT-L/14's text model: the config SD 1.x single files leave out.
SD1_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# A buffer (arange) that older transformers versions saved with the weights.
TRANSFORMERS_IGNORE = ("text_model.embeddings.position_ids",)

_TARGET = f"{OpenCLIPTextConditioner.__module__}.{OpenCLIPTextConditioner.__qualname__}"
_WHAT = "transformers CLIPTextConfig"
# Settings we read, with CLIPTextConfig's defaults for a config.json that omits them.
_USED = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
_FIXED = {
    "model_type": ("clip_text_model",),
    "architectures": ("CLIPTextModel", None),  # CLIPTextModelWithProjection (SDXL's second encoder) adds a projection
    "hidden_act": ("gelu", "quick_gelu"),
    "layer_norm_eps": (1e-5,),  # open_clip's LayerNorm
    "vocab_size": (49408,),  # open_clip's CLIP BPE tokenizer; added tokens (textual inversion) are not supported
}
# Token ids only choose the pooled token (never the context; SD 1.x configs still hold the old 0/2/1); dropout and
# initialisation act in training only; projection_dim is used by CLIPTextModelWithProjection only; the last line
# holds PretrainedConfig's generic output and task options (in to_dict(), not in a saved config.json).
_IGNORED = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "dropout", "initializer_range",
    "initializer_factor", "projection_dim", "torch_dtype", "dtype", "transformers_version",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type",
})

# One block, our names -> transformers' (open_clip's are ours).
_BLOCK = {
    "ln_1.weight": ("layer_norm1.weight",),
    "ln_1.bias": ("layer_norm1.bias",),
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out_proj.weight": ("self_attn.out_proj.weight",),
    "attn.out_proj.bias": ("self_attn.out_proj.bias",),
    "ln_2.weight": ("layer_norm2.weight",),
    "ln_2.bias": ("layer_norm2.bias",),
    "mlp.c_fc.weight": ("mlp.fc1.weight",),
    "mlp.c_fc.bias": ("mlp.fc1.bias",),
    "mlp.c_proj.weight": ("mlp.fc2.weight",),
    "mlp.c_proj.bias": ("mlp.fc2.bias",),
}
_OUTSIDE_BLOCKS = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}


@dataclass(frozen=True)
class _Tower:
    sizes: dict[str, Any]  # TEXT_TOWER_SIZES
    activation: str
    extras: tuple[str, ...]  # tensors of a CLIP model outside its text tower (projection, logit scale)
    context_layers: int  # blocks up to the one whose tokens make the context
    pooled: bool
    pad_token_id: int


def _tower(cond_cfg: Mapping[str, Any]) -> _Tower:
    a = our_args(cond_cfg, OpenCLIPTextConditioner, "text encoder config")
    defaults = inspect.signature(TextTransformer).parameters
    if a["text_cfg"] is not None:
        text_cfg, activation, extras = dict(a["text_cfg"]), a["activation"], ()
        if activation not in ("gelu", "quick_gelu"):
            raise ConfigError(f"text encoder config: activation must be gelu or quick_gelu, got {activation!r}")
    else:
        model_cfg = open_clip.get_model_config(a["model_name"])
        if model_cfg is None:
            raise ConfigError(f"text encoder config: model_name={a['model_name']!r} is no open_clip model")
        if model_cfg.get("custom_text") or model_cfg.get("init_logit_bias") is not None:
            raise ConfigError(f"text encoder config: model_name={a['model_name']!r} is not a plain open_clip CLIP "
                              "(custom text tower or logit bias)")
        text_cfg, activation = dict(model_cfg["text_cfg"]), "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        extras = ("text_projection", "logit_scale")
    unknown = sorted(set(text_cfg) - set(TEXT_TOWER_SIZES))
    if unknown:
        raise ConfigError(f"text encoder config: text_cfg keys {unknown} are not supported (only {TEXT_TOWER_SIZES})")
    sizes = {n: text_cfg.get(n, defaults[n].default) for n in TEXT_TOWER_SIZES}
    context_layers = sizes["layers"] - (a["layer"] == "penultimate")
    return _Tower(sizes, activation, extras, context_layers, a["pooled"], a["pad_token_id"])


def text_encoder_from_transformers_config(config: Mapping[str, Any], *, pad_token_id: int,
                                          model_max_length: int | None = None) -> dict:
    """transformers CLIPTextConfig dict -> our conditioner config whose context is CLIPTextModel's
    last_hidden_state, captions padded with pad_token_id (the tokenizer folder's; model_max_length checked too)."""
    c = read_settings(config, used=_USED, fixed=_FIXED, ignored=_IGNORED, what=_WHAT)
    width, heads, mlp_width = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    if width % heads:
        raise ConfigError(f"{_WHAT}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    mlp_ratio = mlp_width / width
    if int(width * mlp_ratio) != mlp_width:  # open_clip builds its MLP as int(width * mlp_ratio)
        raise ConfigError(f"{_WHAT}: intermediate_size {mlp_width} is not int(hidden_size * r) for any ratio r")
    if model_max_length is not None and model_max_length != c["max_position_embeddings"]:
        raise ConfigError(f"{_WHAT}: the tokenizer's model_max_length {model_max_length} differs from "
                          f"max_position_embeddings {c['max_position_embeddings']}; our tokenizer pads to the latter")
    if not 0 <= pad_token_id < c["vocab_size"]:
        raise ConfigError(f"{_WHAT}: pad_token_id {pad_token_id} is outside the vocabulary")
    return {
        "_target_": _TARGET,
        "model_name": None,
        "pretrained": None,
        "layer": "last",  # last_hidden_state: every block, then final_layer_norm
        "pooled": False,
        "text_cfg": {"context_length": c["max_position_embeddings"], "vocab_size": c["vocab_size"], "width": width,
                     "heads": heads, "layers": c["num_hidden_layers"], "mlp_ratio": mlp_ratio},
        "activation": c["hidden_act"],
        "pad_token_id": pad_token_id,
    }


def open_clip_text_encoder(model_name: str = SD2_OPEN_CLIP_MODEL, *, layer: str = "penultimate",
                           pad_token_id: int = 0) -> dict:
    """Our conditioner config for an open_clip model's text tower as SD 2.x single files store it (all tensors)."""
    return {"_target_": _TARGET, "model_name": model_name, "pretrained": None, "layer": layer, "pooled": False,
            "text_cfg": None, "activation": None, "pad_token_id": pad_token_id}


def _check_transformers(t: _Tower) -> None:
    if t.pooled and (t.extras or t.context_layers < t.sizes["layers"]):
        raise ConfigError("text encoder config: pooled=true needs the projection or the last block, which a "
                          "transformers CLIPTextModel built for this context does not have")


def text_encoder_to_transformers_config(cond_cfg: Mapping[str, Any]) -> dict:
    """Our conditioner config -> the CLIPTextConfig (config.json) whose last_hidden_state is our context: as many
    layers as blocks reach the context (N - 1 at "penultimate"), pad_token_id ours (clip_token gives its text)."""
    t = _tower(cond_cfg)
    _check_transformers(t)
    s = t.sizes
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": s["vocab_size"],
        "hidden_size": s["width"],
        "intermediate_size": int(s["width"] * s["mlp_ratio"]),
        "num_hidden_layers": t.context_layers,
        "num_attention_heads": s["heads"],
        "max_position_embeddings": s["context_length"],
        "hidden_act": t.activation,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": t.pad_token_id,
    }


def clip_text_keymap(cond_cfg: Mapping[str, Any], layout: str) -> KeyMap:
    """Key map {our conditioner state-dict name: theirs} for layout "transformers" (CLIPTextModel names, blocks up
    to the context layer) or "open_clip" (SD 2.x single-file names without "cond_stage_model.model.")."""
    if layout not in LAYOUTS:
        raise ConfigError(f"text encoder layout must be one of {LAYOUTS}, got {layout!r}")
    t = _tower(cond_cfg)
    if layout == "open_clip":
        names = [*_OUTSIDE_BLOCKS, *t.extras,
                 *(f"transformer.resblocks.{i}.{n}" for i in range(t.sizes["layers"]) for n in _BLOCK)]
        return {f"model.{n}": key(n) for n in names}
    _check_transformers(t)
    table = {ours: key(theirs) for ours, theirs in _OUTSIDE_BLOCKS.items()}
    block = {ours: key(*theirs) for ours, theirs in _BLOCK.items()}
    for i in range(t.context_layers):
        table |= prefixed(block, ours=f"transformer.resblocks.{i}.", theirs=f"encoder.layers.{i}.")
    return prefixed(table, ours="model.", theirs="text_model.")


def not_in_transformers(cond_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """Our tensors a CLIPTextModel has no place for (blocks after the context layer, projection, logit scale):
    none reaches the context; transformers_text_state leaves them out (an export should say so)."""
    t = _tower(cond_cfg)
    late = (f"transformer.resblocks.{i}.{n}" for i in range(t.context_layers, t.sizes["layers"]) for n in _BLOCK)
    return tuple(f"model.{n}" for n in (*t.extras, *late))


def transformers_text_state(ours: Mapping[str, Tensor], cond_cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our conditioner's state dict -> the CLIPTextModel state dict (SD folder names) with the same context; the
    tensors `not_in_transformers` lists are left out."""
    dropped = set(not_in_transformers(cond_cfg))
    kept = {name: t for name, t in ours.items() if name not in dropped}
    return to_theirs(kept, clip_text_keymap(cond_cfg, "transformers"), what="the text encoder")


def transformers_text_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPTextModel state dict in the names SD folders use ("text_model." first): transformers >= 5 saves
    without that prefix (and reads both)."""
    prefixed_names = [n for n in state if n.startswith("text_model.")]
    if len(prefixed_names) == len(state):
        return dict(state)
    if prefixed_names:
        bare = sorted(n for n in state if not n.startswith("text_model."))
        raise ConfigError(f"CLIPTextModel weights mix names with and without 'text_model.': {bare[:10]}")
    return {f"text_model.{n}": t for n, t in state.items()}


# --- tokenizer files ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's vocabulary {token: id} and merges (rank order) from open_clip's bundled BPE file."""
    tokenizer = SimpleTokenizer()
    spelled = {"<start_of_text>": SOT, "<end_of_text>": EOT}  # open_clip's names for the same two ids
    vocab = {spelled.get(token, token): i for token, i in tokenizer.encoder.items()}
    merges = tuple(" ".join(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1]))
    return vocab, merges


def clip_token(token_id: int) -> str:
    """The text of one CLIP token id (e.g. a pad id for write_clip_tokenizer: 0 -> "!", 49407 -> <|endoftext|>)."""
    vocab, _ = _clip_bpe()
    for token, i in vocab.items():
        if i == token_id:
            return token
    raise ConfigError(f"pad_token_id {token_id} is not a CLIP token id (0..{len(vocab) - 1})")


def write_clip_tokenizer(folder: str | Path, *, pad_token: str, model_max_length: int = 77) -> None:
    """Write a transformers CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) that tokenizes as open_clip does, padding with pad_token."""
    vocab, merges = _clip_bpe()
    if pad_token not in vocab:
        raise ConfigError(f"pad_token {pad_token!r} is not a CLIP token")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "vocab.json", vocab, indent=None)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad_token}
    atomic_write_json(folder / "special_tokens_map.json", specials)
    atomic_write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer",
                                                         "model_max_length": model_max_length,
                                                         "do_lower_case": True, **specials})


def _token_text(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value  # older files store AddedToken dicts


def _merges_text(merges: list) -> tuple[str, ...]:
    return tuple(" ".join(m) if isinstance(m, list) else m for m in merges)  # tokenizer.json: pairs or "a b"


def _check_clip_bpe(folder: Path) -> None:
    vocab, merges = _clip_bpe()
    slow, fast = folder / "vocab.json", folder / "tokenizer.json"  # transformers < 5 saves the first, >= 5 the second
    if not slow.exists() and not fast.exists():
        raise ConfigError(f"{folder}: no vocab.json or tokenizer.json; not a CLIP tokenizer folder")
    if slow.exists():
        try:
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(f"cannot read {folder}/merges.txt: {error}") from error
        their_merges = tuple(line for line in lines if line and not line.startswith("#version"))
        if read_json(slow) != vocab or their_merges != merges:
            raise ConfigError(f"{folder}: vocab.json/merges.txt are not CLIP's BPE; only that tokenizer is supported")
    if fast.exists():
        fast_json = read_json(fast)
        model = fast_json.get("model", {})
        if model.get("vocab") != vocab or _merges_text(model.get("merges", [])) != merges:
            raise ConfigError(f"{fast} is not CLIP's BPE; only that tokenizer is supported")
        added = [t.get("content") for t in fast_json.get("added_tokens", [])
                 if vocab.get(t.get("content")) != t.get("id")]
        if added:
            raise ConfigError(f"{fast} adds tokens {added}; added tokens (e.g. textual inversion) are not supported")
    if (folder / "added_tokens.json").exists():
        raise ConfigError(f"{folder}/added_tokens.json: added tokens (e.g. textual inversion) are not supported")


def read_clip_tokenizer(folder: str | Path) -> dict[str, Any]:
    """Check a tokenizer folder is CLIP's BPE (same vocabulary and merges, CLIP's special tokens, nothing added)
    and return dict(pad_token, pad_token_id, model_max_length)."""
    folder = Path(folder)
    _check_clip_bpe(folder)
    vocab, _ = _clip_bpe()
    config = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").exists() else {}
    # CLIPTokenizer reads both files, tokenizer_config.json first; its own default pad token is <|endoftext|>.
    specials = {name: _token_text(config.get(name, special_map.get(name, default)))
                for name, default in (("bos_token", SOT), ("eos_token", EOT), ("pad_token", EOT))}
    if (specials["bos_token"], specials["eos_token"]) != (SOT, EOT):
        raise ConfigError(f"{folder}: bos/eos tokens {specials['bos_token']!r}, {specials['eos_token']!r} are not "
                          f"CLIP's {SOT}, {EOT}")
    if specials["pad_token"] not in vocab:
        raise ConfigError(f"{folder}: pad_token {specials['pad_token']!r} is not in the vocabulary")
    added = sorted(int(i) for i, token in config.get("added_tokens_decoder", {}).items()
                   if vocab.get(_token_text(token)) != int(i))
    if added:
        raise ConfigError(f"{folder}/tokenizer_config.json adds tokens {added}; added tokens are not supported")
    if config.get("tokenizer_class", "CLIPTokenizer") not in ("CLIPTokenizer", "CLIPTokenizerFast"):
        raise ConfigError(f"{folder}: tokenizer_class {config['tokenizer_class']!r} is not CLIPTokenizer")
    max_length = config.get("model_max_length")
    if not isinstance(max_length, int) or max_length <= 2:
        raise ConfigError(f"{folder}/tokenizer_config.json: model_max_length {max_length!r} must be set (77 for SD)")
    return {"pad_token": specials["pad_token"], "pad_token_id": vocab[specials["pad_token"]],
            "model_max_length": max_length}
