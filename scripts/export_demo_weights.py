"""Copy a training run's EMA weights into the package as a shipped demo model (float16 safetensors; a latent
model's autoencoder float32).

    python scripts/export_demo_weights.py runs/demo-p188                                  # -> vdit/demo/assets/demo/
    python scripts/export_demo_weights.py runs/latent --out vdit/demo/assets/demo-latent
"""
import argparse
import json
import os

from vdit.demo.checkpoint import EMA_FILE, STATE_FILE, load_tensors, read_json
from vdit.demo.pipeline import TextToVideo

# The shipped weights of this checkout (vdit.demo.pipeline.ASSETS: those of the vdit that is imported).
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vdit", "demo", "assets", "demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="vdit-train --out directory")
    parser.add_argument("--out", default=ASSETS)
    args = parser.parse_args()
    model = TextToVideo.from_config(read_json(os.path.join(args.run, TextToVideo.CONFIG_FILE)))
    ema = load_tensors(os.path.join(args.run, EMA_FILE))
    model.load_state_dict(ema)
    state = read_json(os.path.join(args.run, STATE_FILE))
    # Runs saved before config.json carried the sampling shift: sample at the shift they trained with.
    model.sampling_shift = state["args"].get("timestep_shift", model.sampling_shift)
    # A latent model's autoencoder (latent.*) stays float32, byte for byte the autoencoder it was trained with.
    state_dict = {k: v if k.startswith("latent.") or not v.is_floating_point() else v.half()
                  for k, v in model.state_dict().items()}
    model.save(args.out, state_dict=state_dict)
    step = state["step"]
    with open(os.path.join(args.out, "training.json"), "w") as f:
        # args are those of the run's latest invocation (vdit-train resumes with the arguments it is given)
        json.dump({"source_run": os.path.basename(os.path.normpath(args.run)), "step": step, "args": state["args"]},
                  f, indent=2)
    size = os.path.getsize(os.path.join(args.out, TextToVideo.WEIGHTS_FILE)) / 2**20
    print(f"exported the EMA weights of step {step} to {args.out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
