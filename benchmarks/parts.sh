# Sourced by the benchmark scripts that run in parts on a GPU machine (prepass_check.sh,
# issue16_targets.sh, issue17_gluon_check.sh), after they set all_parts (e.g. "1,2,3"):
# reads OUT_DIR ($1) and PARTS ($2, default all_parts) into $out and want(), and writes the
# card, its driver and the torch and triton versions into $out/card.txt.
set -u
out=$1
parts=",${2:-$all_parts},"
want() { [[ $parts == *",$1,"* ]]; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  >> "$out/card.txt"
