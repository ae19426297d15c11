"""The README and docs/ point at things that exist, and every flag explains itself."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from training_helpers import subprocess_env

PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
# Paths the commands create or that stand for the user's own files: not checked.
CREATED = ("runs/", "out/", "exported/", "/", "~", "$", "pred", "my_", "ai_challenger/", "coco/", "photos/",
           "folder/", "val2017/", "train2017/", "keypoint_", "person_keypoints_", "hrnet_w32_imagenet")
TOP = ("config/", "nets/", "dataset/", "utils/", "tools/", "tests/", "docs/", ".ci/", "requirements")


def _headings(text):
    """GitHub's anchors of a page's headings."""
    out = set()
    for title in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def _paths(text):
    """Backticked tokens that name a repository file or folder, e.g. `nets/spr.py`."""
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,:;")
        if token.startswith(TOP) or re.fullmatch(r"[\w-]+\.(py|md|txt|ini)", token):
            if not any(ch in token for ch in "*<>{}|=") and not token.startswith(CREATED):
                yield token


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_named_file_exists(page):
    text = open(os.path.join(ROOT, page)).read()
    base = os.path.dirname(os.path.join(ROOT, page))
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            missing.append(f"link {target}")
        elif anchor and full.endswith(".md") and anchor not in _headings(open(full).read()):
            missing.append(f"anchor {target}")
    for token in _paths(text):
        name = token.split("::")[0]
        candidates = [os.path.join(ROOT, name), os.path.join(ROOT, name.lstrip("./"))]
        if not any(os.path.exists(c) for c in candidates) and not re.fullmatch(r"[\w-]+\.(py|md|txt|ini)", name):
            missing.append(f"path {token}")
        elif re.fullmatch(r"[\w-]+\.(py|md|txt|ini)", name) and not _somewhere(name):
            missing.append(f"file {token}")
    assert not missing, f"{page}: {missing}"


def _somewhere(name):
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__")]
        if name in files:
            return True
    return False


def test_the_readme_is_short():
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250


TOOLS = ["tools/model_val.py", "tools/spm_model_test.py", "tools/export.py", "tools/ai_format_kps_eval.py",
         "tools/convert_annotations.py", "tools/dataset_test.py", "tools/make_synthetic.py", "tools/plot_history.py",
         "tools/convert_hrnet_weights.py"]


def _bare_flags(help_text):
    """The flags of an argparse --help text that have no description."""
    entries = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    bare = []
    for entry in entries:
        if not entry.strip():
            continue
        entry = entry.split("\n\n")[0]                 # a group title follows a blank line
        flag = entry.strip().split()[0]
        text = re.sub(r"^\S+( [A-Z_,{}V]+)?(, --no-\S+)?", "", entry.strip()).strip()
        text = re.sub(r"\(base default [^)]*\)", "", text).strip()
        if not text:
            bare.append(flag)
    return bare


# Every tool's --help in one process (one TensorFlow import instead of one per tool).
_TOOL_HELPS = """
import contextlib, io, runpy, sys
out = {}
for tool in sys.argv[1:]:
    sys.argv = [tool, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(tool, run_name="__main__")
        except SystemExit:
            pass
    out[tool] = buf.getvalue()
import json
print(json.dumps(out))
"""


@pytest.mark.parametrize("script", ["main.py", "distribute_main.py"])
def test_every_flag_of_the_training_commands_has_a_description(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not _bare_flags(r.stdout), f"{script} --help: flags without a description: {_bare_flags(r.stdout)}"
    assert "a GPU option" in r.stdout                                   # --xla says where it helps


def test_every_flag_of_the_tools_has_a_description():
    import json

    r = subprocess.run([sys.executable, "-c", _TOOL_HELPS, *TOOLS], capture_output=True, text=True,
                       env=subprocess_env(), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    helps = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(helps) == sorted(TOOLS)
    bare = {tool: _bare_flags(text) for tool, text in helps.items() if _bare_flags(text)}
    assert all("options:" in text for text in helps.values()) and not bare, bare
