"""Drop-in nn.Modules built on vdit ops (state_dict compatible with the modules they replace)."""
from vdit.nn.adaln import AdaLNModulation
from vdit.nn.attention import VarlenCrossAttention, VarlenSelfAttention
from vdit.nn.patch_embed import PatchEmbed3d, PatchUnembed3d
from vdit.nn.rope import RotaryEmbedding3d

__all__ = ["AdaLNModulation", "PatchEmbed3d", "PatchUnembed3d", "RotaryEmbedding3d", "VarlenCrossAttention",
           "VarlenSelfAttention"]
