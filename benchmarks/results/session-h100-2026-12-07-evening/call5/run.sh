# Device call 5 (issue 16), on call 4's machine while warm, after fixing the launcher's hook test
# (Triton 3.6 keeps an empty HookChain as launch_enter_hook, so call 4 never launched directly).
python3 -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('site') for w in glob.glob('.whl/*.whl')]"; export PYTHONPATH=$PWD/site:$PWD; python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_launch.py 2>&1 | tail -3 | cut -c1-300; mkdir -p $OUT/r5; timeout 70 python3 lab/direct_launch_ab.py --backend sage_attn --rounds 3 --out $OUT/r5/direct-ab-sage_attn.json 2>&1 | tail -3
# output: 2 passed, 5 deselected in 1.93s
# sage_attn direct: mixed steps 9, median wall 11.89 ms (min 11.30), decode median 9.40 ms
# sage_attn through_triton: mixed steps 9, median wall 13.24 ms (min 11.15), decode median 7.73 ms
