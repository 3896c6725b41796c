"""The wheel puts one name into site-packages, `lazymoe` (generic names such as `kernels` belong to other
PyPI projects, e.g. Hugging Face's), and ships the demo model inside it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_has_one_top_level_name(tmp_path):
    # build from a copy of the tracked files, so setuptools' build/ and egg-info stay out of the checkout
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lazymoe"}, tops
    for module in ("lazymoe/cli.py", "lazymoe/kernels/dispatch.py", "lazymoe/format/gguf_file.py",
                   "lazymoe/quantize/convert.py", "lazymoe/runtime/model.py", "lazymoe/runtime/data/lazymoe-demo-q4_0.gguf",
                   "lazymoe/serve/server.py", "lazymoe/serve/page.html"):
        assert module in names, module
