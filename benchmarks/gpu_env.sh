# Sourced by the GPU scripts (gpu_suite.sh, gpu_efficiency.sh): from the repository root, take
# OUT_DIR (first argument if it is not an option, else $OUT, else the script's default, passed
# as $default_out) into $out_dir and the remaining arguments into $args; find Fashion-MNIST
# ($SMI_FASHION_MNIST_DIR, else data/fashion-mnist/, an ignored folder `make gpu-data` fills and
# that travels with the checkout, else Debian's /usr/share/datasets/fashion-mnist/); run from the
# checkout (PYTHONPATH=.) with $python.
cd "$(dirname "$0")/.."
out_dir="${OUT:-$default_out}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  out_dir="$1"
  shift
fi
args=("$@")
mkdir -p "$out_dir"

for dir in "${SMI_FASHION_MNIST_DIR:-}" data/fashion-mnist /usr/share/datasets/fashion-mnist; do
  if [[ -n "$dir" && -f "$dir/train-images-idx3-ubyte.gz" ]]; then
    export SMI_FASHION_MNIST_DIR="$(cd "$dir" && pwd)"
    break
  fi
done
if [[ ! -f "${SMI_FASHION_MNIST_DIR:-}/train-images-idx3-ubyte.gz" ]]; then
  echo "$(basename "$0"): Fashion-MNIST not found; run 'make gpu-data' before sending the" \
    "checkout, or set SMI_FASHION_MNIST_DIR" >&2
  exit 2
fi

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
