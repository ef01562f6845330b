# call 3 (H100, 2026-12-07 ~03:24 UTC), as run on the device from the repository root
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"; export PYTHONPATH=$PWD/site:$PWD; mkdir -p $OUT/w
timeout 300 python3 lab/store_config_sweep.py --out $OUT/w/store-sweep.json > $OUT/w/store-sweep.log 2>&1
