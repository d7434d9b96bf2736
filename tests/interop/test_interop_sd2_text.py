"""SD 2.x single files keep OpenCLIP's 24th text block (never read: SD takes the penultimate); ours, like diffusers,
keeps 23. The tail is dropped on import and written back as a no-op on export, and the context is unchanged."""
import torch

from ldm.interop.clip_text import clip_text_keymap
from ldm.interop.keymap import to_ours, to_theirs
from ldm.interop.sd2_text import TAIL_EXTRAS, unused_tail, with_noop_tail, writes_open_clip_layout
from ldm.nn.conditioners import OpenCLIPTextConditioner

SIZES = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "mlp_ratio": 2.0}


def tower(layers: int, layer: str) -> dict:
    return {"_target_": "ldm.nn.conditioners.OpenCLIPTextConditioner", "model_name": None, "pretrained": None,
            "layer": layer, "pooled": False, "text_cfg": {**SIZES, "layers": layers}, "activation": "gelu",
            "pad_token_id": 0}


def build(cfg: dict) -> OpenCLIPTextConditioner:
    return OpenCLIPTextConditioner(**{k: v for k, v in cfg.items() if k != "_target_"})


def test_the_no_op_tail_keeps_the_context_and_is_dropped_again_on_import():
    torch.manual_seed(0)
    short_cfg, long_cfg = tower(2, "last"), tower(3, "penultimate")
    short = build(short_cfg)
    for p in short.parameters():
        p.data.normal_(0, 0.05)
    file_state = with_noop_tail(to_theirs(short.state_dict(), clip_text_keymap(short_cfg, "open_clip"), what="t"),
                                short_cfg)
    tail = unused_tail(short_cfg, file_state)
    assert set(TAIL_EXTRAS) <= set(tail) and all(k in TAIL_EXTRAS or k.startswith("transformer.resblocks.2.")
                                                 for k in tail) and len(tail) == 12 + 2
    # SD 2.x's reading (all three blocks loaded, the penultimate used) gives our context
    long = build(long_cfg)
    shapes = {k: v.shape for k, v in long.state_dict().items()}
    long.load_state_dict(to_ours(file_state, clip_text_keymap(long_cfg, "open_clip"), shapes, what="t",
                                 ignore=TAIL_EXTRAS))
    captions = {"caption": ["a red circle", "two squares"]}
    torch.testing.assert_close(long.encode(captions)["context"], short.encode(captions)["context"], atol=0, rtol=0)
    # and the import of the file into the short tower takes everything but the tail, identically
    shapes = {k: v.shape for k, v in short.state_dict().items()}
    back = to_ours(file_state, clip_text_keymap(short_cfg, "open_clip"), shapes, what="t", ignore=tail)
    assert all(torch.equal(back[k], v) for k, v in short.state_dict().items())


def test_which_towers_go_to_open_clip_layout():
    assert writes_open_clip_layout({"model_name": "ViT-H-14", "text_cfg": None})
    assert writes_open_clip_layout({**tower(23, "last"), "text_cfg": {**SIZES, "width": 1024, "layers": 23}})
    assert not writes_open_clip_layout({**tower(12, "last"), "activation": "quick_gelu"})  # SD 1.x: CLIP ViT-L/14
    assert unused_tail(tower(3, "penultimate"), {"transformer.resblocks.3.ln_1.weight": torch.ones(1)}) == ()
