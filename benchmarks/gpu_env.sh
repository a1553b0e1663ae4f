# Source on a GPU machine with no package index, from the checkout root, with the wheels in .whl/
# (docs/gpu.md lists them): installs them into /tmp/site and exposes this checkout as plait.* through
# symlinks, so the image's own torch is used and nothing is installed against it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pl/plait
for part in train parallel optim offload data launch configs common; do ln -sfn "$PWD/$part" "/tmp/pl/plait/$part"; done
export PYTHONPATH="/tmp/pl:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PLAIT_CACHE="${PLAIT_CACHE:-/tmp/plait-cache}"
