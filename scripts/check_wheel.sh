#!/usr/bin/env bash
# The installed package as a user gets it: build the wheel, install it (not editable) into a clean
# virtual environment beside a package that owns a top-level `recipes` module (as torchtune does),
# and from another folder, with no PYTHONPATH, list the recipes and run a 2-step `pretrain mlm`.
# Called by .ci/run after the tests; run it by hand with `bash scripts/check_wheel.sh`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "check_wheel: building the wheel"
"$python" -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$root"

# a rival distribution with its own top-level `recipes` package
mkdir -p "$work/rival/recipes"
printf 'OWNER = "rival"\n' > "$work/rival/recipes/__init__.py"
cat > "$work/rival/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "rival-recipes"
version = "1.0"
[tool.setuptools]
packages = ["recipes"]
TOML

echo "check_wheel: installing it into a clean virtual environment beside rival-recipes"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$work/rival" "$work"/dist/multissl-*.whl

mkdir "$work/elsewhere"
cd "$work/elsewhere"
export -n PYTHONPATH 2>/dev/null || true
unset PYTHONPATH
export HF_HUB_OFFLINE=1
listing=$("$work/venv/bin/multissl" recipes)
echo "$listing"
grep -q "^pretrain mlm: .*tiny.yaml" <<<"$listing"
grep -q "^finetune text-classification: tiny.yaml" <<<"$listing"
"$work/venv/bin/multissl" pretrain mlm --config tiny trainer.max_steps=2 trainer.output_dir="$work/out" trainer.progress_bar=false \
  trainer.trackers=[] data.vocab_size=500 model.hidden_size=32 model.intermediate_size=64 trainer.eval_max_batches=1
test -f "$work/out/model/config.json" && test -f "$work/out/model/README.md" && test -f "$work/out/config.yaml"
"$work/venv/bin/python" - <<'PY'
import importlib.util
import recipes
import multissl_recipes
assert recipes.OWNER == "rival", recipes.__file__
assert importlib.util.find_spec("multissl_recipes.mlm") is not None
print("check_wheel: the rival's top-level recipes is untouched; multissl's are", multissl_recipes.__path__[0])
PY
echo "check_wheel: passed"
