set -u
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"
export PYTHONPATH=$PWD/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv
mkdir -p $OUT/w
pack() { (cd $OUT && tar czf call1-$1.tgz w); }
bash benchmarks/issue17_gluon_check.sh $OUT/w 7; pack a; echo "t=$SECONDS"
timeout 150 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_sage_q_levels.py > $OUT/w/q-levels-gpu-test.log 2>&1; tail -3 $OUT/w/q-levels-gpu-test.log
timeout 150 python3 lab/q_levels_probe.py --out $OUT/w/q-levels.json > $OUT/w/q-levels.log 2>&1; cat $OUT/w/q-levels.log | tail -20; pack b; echo "t=$SECONDS"
left=$((585 - SECONDS)); [[ $left -gt 60 ]] && timeout $left bash benchmarks/issue17_gluon_check.sh $OUT/w 8; pack c
echo elapsed $SECONDS
