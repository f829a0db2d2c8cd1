# Sourced at the start of a device call (see eval/gpu/README.md): makes the package
# importable without an install (kernels/, train/ and eval/ linked into it, as
# pyproject's package-dir does) and installs carried wheels (.whl/) for the
# modules that machine lacks, after its own site-packages so nothing is shadowed.
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # several trainings share 16 cores: no oversubscription
for d in kernels train eval; do [ -e tokenizers_vq/$d ] || ln -s ../$d tokenizers_vq/$d; done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
missing=$(python3 - <<'PY'
import importlib.util
wanted = {"_cffi_backend": "cffi", "pycparser": "pycparser", "soundfile": "soundfile", "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm",
          "pytorch_msssim": "pytorch_msssim", "accelerate": "accelerate", "vector_quantize_pytorch": "vector_quantize_pytorch",
          "einx": "einx", "loguru": "loguru", "torch_einops_utils": "torch_einops_utils", "frozendict": "frozendict", "lpips": "lpips", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments",
          "packaging": "packaging", "einops": "einops", "matplotlib": "matplotlib",
          "flash_kmeans": "flash_kmeans", "encodec": "encodec"}
print(" ".join(w for m, w in wanted.items() if importlib.util.find_spec(m) is None))
PY
)
echo "modules missing here: ${missing:-none}"
if [ -d .whl ] && [ -n "$missing" ]; then
  wheels=""
  for w in $missing; do wheels="$wheels $(ls .whl/${w}-*.whl .whl/${w//_/-}-*.whl 2>/dev/null | head -1)"; done
  if [ -n "${wheels// /}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels
    site=$(python3 -c "import site; print(site.getsitepackages()[0])")
    echo /tmp/site > "$site/zz_carried_wheels.pth"  # after the machine's own packages
  fi
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
