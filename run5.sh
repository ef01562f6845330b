set -u
export PYTHONPATH=$PWD
R=$OUT/call5
mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/card.txt
timeout 300 python3 lab/quantize_q_probe.py --out $R/quantize-q.json 2>&1 | tee $R/quantize-q.log | tail -40
