#!/usr/bin/env bash
# End-to-end check on a GPU machine: reap.py in every engine x mode (bf16, cuda) on the tiny fixture, the
# scores compared across them, then prune_model.py --verify and test_pruned_model.py.  Needs the project's
# requirements importable by python3 (on the lent H100 only python-dotenv was missing: put its wheel on
# PYTHONPATH).  Seen 2026-11-23 on an H100: every combination kept the same experts; layer-wise = whole
# model exactly, routed = full within 1.5e-8 relative; verify forward ok; test PASS (surgery exact).
set -euo pipefail

python3 -c "import torch, transformers, accelerate, safetensors, tqdm, matplotlib; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
python3 -m reap_vlm.fixtures /tmp/d >/dev/null
C=(--model /tmp/d/model --calibration /tmp/d/calibration/calibration_data.json --device cuda --prune-ratio 0.25
   --batch-size 3 --no-resume)
for eng in model layerwise; do for mode in full routed; do
  python3 reap.py "${C[@]}" --engine "$eng" --mode "$mode" --output "/tmp/o/$eng-$mode" 2>&1 \
    | grep -E "error|mode/|samples|never|timings"
done; done
python3 - <<'PY'
import json
m={k: json.load(open(f"/tmp/o/{k}/reap_metadata.json")) for k in ["model-full","model-routed","layerwise-full","layerwise-routed"]}
import numpy as np
a=np.array(m["model-full"]["metrics"]["reap"])
for k,v in m.items():
    b=np.array(v["metrics"]["reap"]); print(k, v["dtype"], v["run"]["engine"], "max rel diff vs model-full", float(np.max(np.abs(b-a)/np.maximum(np.abs(a),1e-12))), "same keep", v["experts_to_keep"]==m["model-full"]["experts_to_keep"])
PY
python3 prune_model.py --model /tmp/d/model --reap-output /tmp/o/model-full --output /tmp/o/pruned --verify 2>&1 | tail -4
python3 test_pruned_model.py --model /tmp/o/pruned --calibration /tmp/d/calibration/calibration_data.json --output /tmp/o/report --device cuda --num-prompts 4 --max-new-tokens 8 2>&1 | tail -3
cp /tmp/o/report/test_report.md "${OUT:-/tmp/o}"/ 2>/dev/null || true
