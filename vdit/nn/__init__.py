"""Drop-in nn.Modules built on vdit ops (state_dict compatible with the modules they replace)."""
from vdit.nn.adaln import AdaLNModulation
from vdit.nn.attention import VarlenCrossAttention, VarlenSelfAttention
from vdit.nn.patch_embed import PatchEmbed3d, PatchUnembed3d
from vdit.nn.rope import RotaryEmbedding3d
from vdit.nn.sparse_attention import TileSparseAttention

__all__ = ["AdaLNModulation", "PatchEmbed3d", "PatchUnembed3d", "RotaryEmbedding3d", "TileSparseAttention",
           "VarlenCrossAttention",
           "VarlenSelfAttention"]
