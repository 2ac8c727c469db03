"""The demo's old module paths (vdit.train, vdit.checkpoint, ...) still import, as the vdit.demo modules
themselves, and the library imports without the demo."""
import importlib
import os
import subprocess
import sys

import pytest

from vdit._aliases import ALIASES

LIBRARY = ("vdit, vdit.ops, vdit.nn, vdit.models, vdit.sampling, vdit.training, vdit.packing, vdit.distributed, "
           "vdit.swap")


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_old_path_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(ALIASES[old])
    assert sys.modules[old] is sys.modules[ALIASES[old]]


def test_old_names_reach_the_same_objects():
    import vdit.checkpoint
    import vdit.demo.checkpoint
    import vdit.io.video
    import vdit.models
    from vdit.data.shapes import ShapesDataset
    from vdit.demo import data, pipeline, text, video_io
    from vdit.pipelines.text_to_video import TextToVideo
    from vdit.train import with_added_modules

    assert vdit.checkpoint.CheckpointError is vdit.demo.checkpoint.CheckpointError
    assert vdit.io.video.save_video is video_io.save_video  # attribute access through an old package
    assert ShapesDataset is data.ShapesDataset and TextToVideo is pipeline.TextToVideo
    assert vdit.models.TextEncoder is text.TextEncoder and vdit.models.WordTokenizer is text.WordTokenizer
    from vdit.demo.growth import with_added_modules as grow

    assert with_added_modules is grow
    assert vdit.checkpoint.__spec__.name == "vdit.demo.checkpoint"  # the module keeps its own spec
    with pytest.raises(AttributeError):
        vdit.models.NoSuchModel


def test_every_target_is_a_vdit_demo_module():
    for old, new in ALIASES.items():
        assert new.startswith("vdit.demo.") and not old.startswith("vdit.demo")
        parent = old.rpartition(".")[0]
        if parent in ALIASES:  # an old package's submodule: they must share the new module (see _aliases)
            assert ALIASES[parent] == new, old


def test_library_imports_without_the_demo():
    result = run_python("-c", f"import sys, {LIBRARY}; "
                              "demo = [m for m in sys.modules if m.startswith('vdit.demo')]; assert not demo, demo")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("module,prog", [("vdit.train", "vdit-train"), ("vdit.generate", "vdit-generate"),
                                         ("vdit.eval_demo", "vdit-eval-demo")])
def test_python_dash_m_old_path_runs_the_new_module(module, prog):
    result = run_python("-m", module, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {prog}")
