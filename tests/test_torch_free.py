"""The modules an API process uses (archive checks and manifest, the CSV formats, the vocabulary)
load and run without torch: the API must not pay torch's start-up time and memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import io, sys, zipfile
    from pathlib import Path

    import sp2ot_engine.io.archive as archive
    import sp2ot_engine.io.collection as collection
    import sp2ot_engine.io.labels_csv as labels_csv
    import sp2ot_engine.options as options
    from PIL import Image

    tmp = Path(sys.argv[1])
    buf = io.BytesIO()
    Image.new("RGB", (5, 3)).save(buf, "PNG")
    with zipfile.ZipFile(tmp / "a.zip", "w") as z:
        z.writestr("a.png", buf.getvalue())
        z.writestr("notes.txt", "hello")
    manifest = archive.inspect_archive(tmp / "a.zip", archive.Limits(max_members=10))
    manifest.write(archive.manifest_path(tmp / "a.zip"))
    assert archive.Manifest.read(archive.manifest_path(tmp / "a.zip")) == manifest
    assert manifest.total_pixels == 15 and len(manifest.skipped) == 1
    labels_csv.write_labels(tmp / "labels.csv", [("a.png", 0, 0.5)])
    assert labels_csv.read_labels(tmp / "labels.csv") == {"a.png": "0"}
    assert options.Mode("fast") == "fast" and "sp2ot" in options.FORMULATIONS
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision", "timm")))
    print(loaded)
    assert not loaded, loaded
""")


def test_api_side_modules_do_not_import_torch(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "[]"
