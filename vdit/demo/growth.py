"""Growing a trained demo model: adding optional modules at zero, so that its function stays unchanged.

``vdit-train --init-weights W --fractional-positions / --prompt-velocity / --text-embedding-skip`` continues
from trained weights with modules they lack; each of these modules starts with a zero output projection, so
the grown model computes exactly what the loaded one did until training moves it.
"""
from __future__ import annotations

from vdit.demo.pipeline import TextToVideo

# Parameter-name prefixes of the modules that the three flags add, in the order of the flags.
ADDED_MODULES = ("dit.position_embed.", "dit.prompt_velocity.", "text_encoder.skip.")


def with_added_modules(model: TextToVideo, *, fractional_positions: bool = False, prompt_velocity: bool = False,
                       embedding_skip: bool = False) -> TextToVideo:
    """``model`` with a FractionalPositionEmbedding, a PromptVelocity (which brings the former) and/or a
    text-encoder embedding skip added where asked for and not there yet, on ``model``'s device and in its
    train/eval mode; ``model`` itself when nothing is to be added. The added modules start at zero, so the
    grown model maps (videos (C, T, H, W) each, timesteps (B,), prompts) to the same velocities."""
    config = model.config_dict()
    config["dit"]["fractional_positions"] |= fractional_positions or prompt_velocity
    config["dit"]["prompt_velocity"] |= prompt_velocity
    config["text_encoder"]["embedding_skip"] |= embedding_skip
    if config == model.config_dict():
        return model
    grown = TextToVideo.from_config(config).to(next(model.parameters()).device)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(ADDED_MODULES) for k in missing), (missing, unexpected)
    return grown.train(model.training)
