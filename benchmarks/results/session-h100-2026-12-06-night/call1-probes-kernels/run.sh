set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call1
mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $R/card.txt
cat $R/card.txt
timeout 120 python3 lab/quantize_q_probe.py --tokens 448,1024,16384 --out $R/quantize-q.json > $R/quantize-q.log 2>&1; echo "quantize rc $?"; tail -30 $R/quantize-q.log
timeout 90 python3 lab/launch_path_probe.py --out $R/launch-path.json > $R/launch-path.log 2>&1; echo "launch rc $?"; tail -25 $R/launch-path.log
timeout 120 python3 lab/host_wrapper_probe.py --device cuda --repeats 500 --breakdown 300 > $R/host-wrapper-breakdown.json 2> $R/host-wrapper-breakdown.log; echo "host rc $?"
timeout 290 python3 -m sageserve bench kernels \
  --variants sage_fp16pv_gluon,sage_fp16pv_gluon_norot,sage_fp8pv_gluon,sage_fp8pv_gluon_norot,sage_fp16pv,sage_fp16pv_norot,sdpa_cudnn \
  --head-dims 128,64 --seq-lens 1024,8192,32768 --skip-decode --skip-store --out $R/kernels.json > $R/kernels.log 2>&1; echo "kernels rc $?"
tail -45 $R/kernels.log
