#!/usr/bin/env bash
# docs/results.md "Semi-supervised": 10 % fine-tuning (VICReg settings) of the four Fashion-MNIST
# models x seeds 0 1 2, side by side on one GPU (twelve runs, about 100 s on an H200). From the
# repository root, on a machine with the checkout and data/ (ignored; it travels with `carry`):
#   make gpu-data                                  # data/fashion-mnist
#   smi-hub export runs/fmnist_resnet18_barlow_twins/checkpoints/checkpoint_00001170.pt data/models/barlow_twins
#   smi-hub export runs/fmnist_resnet18_vicreg/checkpoints/checkpoint_00001170.pt data/models/vicreg
#   bash benchmarks/gpu_semisup.sh OUT_DIR --device cuda   # OUT_DIR/semisup_seeds.json
set -uo pipefail
out=$1; shift
work=/tmp/semisup_seeds
export PYTHONPATH=. HF_HUB_OFFLINE=1 SMI_FASHION_MNIST_DIR=$PWD/data/fashion-mnist PYTHONUNBUFFERED=1
declare -A MODEL=(
  [smi]="--weights smi_resnet18_fmnist"
  [barlow_twins]="--weights data/models/barlow_twins"
  [vicreg]="--weights data/models/vicreg"
  [random]="--random-init --config training/configs/fmnist_resnet18_smi.yaml"
)
for m in smi barlow_twins vicreg random; do for s in 0 1 2; do
  d=$work/$m/seed$s; mkdir -p $d
  python3 -m training.evaluate semisup --fraction 0.1 ${MODEL[$m]} --seed $s --num-workers 2 "$@" \
      --subset-dir $d/subsets --out $d/semisup_0.1.json > $d/log 2>&1 &
done; done
wait
python3 - $work $out <<'PY'
import glob, hashlib, json, sys
work, out = sys.argv[1:]
rows = {}
for f in sorted(glob.glob(f"{work}/*/seed*/semisup_0.1.json")):
    d = json.load(open(f)); key = "/".join(f.split("/")[-3:-1])
    sub = d["settings"]["subset_file"]
    rows[key] = {"metrics": d["metrics"], "seconds": d["settings"].get("seconds"),
                 "subset_sha256": hashlib.sha256(open(sub, "rb").read()).hexdigest()[:16],
                 "final_train_loss": (d.get("history") or [{}])[-1]}
    print(key, rows[key]["metrics"], rows[key]["subset_sha256"], rows[key]["seconds"])
json.dump(rows, open(f"{out}/semisup_seeds.json", "w"), indent=1)
PY
for f in $work/*/seed*/log; do grep -l -i "error\|traceback" $f; done | head
