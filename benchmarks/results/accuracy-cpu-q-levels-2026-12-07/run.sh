cd /work/main
V="sage_attn --sage-q-levels 2"
for spec in "pydoc 2048 24" "pydoc 512 96" "britannica 512 96" "britannica 2048 24"; do
  set -- $spec
  PYTHONPATH=. .venv/bin/python benchmarks/sage_error_ablation.py --lengths $2 --windows $3 --no-per-layer --only "$V" --text $1 --out /tmp/ql/$1-$2.json > /tmp/ql/$1-$2.log 2>&1
done
