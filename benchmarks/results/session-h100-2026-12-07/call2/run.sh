# call 2 (H100, 2026-12-07 ~03:21 UTC), as run on the device from the repository root
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"; export PYTHONPATH=$PWD/site:$PWD; mkdir -p $OUT/w
timeout 60 python3 -m pytest -x -q -m gpu -p no:cacheprovider tests/test_gluon_prefill.py -k lazy_rescale --tb=short > $OUT/w/lazy-fail.log 2>&1
bash benchmarks/issue16_targets.sh $OUT/w/i16 9
bash benchmarks/issue17_gluon_check.sh $OUT/w/i17 6
