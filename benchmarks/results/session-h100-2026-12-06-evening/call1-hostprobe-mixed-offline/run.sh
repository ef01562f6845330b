set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call1
mkdir -p $R
timeout 100 python3 lab/host_wrapper_probe.py --device cuda --repeats 1000 > $R/host-wrapper-cuda.json 2> $R/host-wrapper-cuda.log; tail -25 $R/host-wrapper-cuda.json; tail -3 $R/host-wrapper-cuda.log
bash benchmarks/issue16_targets.sh $R 7,1 2>&1 | tail -40
