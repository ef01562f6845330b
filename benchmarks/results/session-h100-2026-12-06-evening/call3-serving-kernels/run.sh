set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
R=$OUT/call3
mkdir -p $R
bash benchmarks/issue16_targets.sh $R/i16 3 2>&1 | grep -E "ITL|throughput|compiled|errors"
rm -f $R/i16/serving/server-*.log $R/i16/serving/kernels-2-r1.txt
bash benchmarks/issue17_gluon_check.sh $R/i17 2 2>&1 | tail -30
