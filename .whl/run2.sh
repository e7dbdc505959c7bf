set -x
B=tests/benchmarks/bench_train.py
for z in 0 1 2; do python3 $B --sections a --device cuda --precision bf16 --step-model res_inception_unet --step-overrides '{"in_channels": 3}' --steps 15 --warmup 3 --step-batch 8 --step-size 256 --step-zero $z --fused 2>&1 | grep -E "^\(a\)"; done
python3 $B --sections a --device cuda --precision bf16 --step-model unet3d --step-overrides '{"in_channels": 4}' --steps 15 --warmup 3 --step-batch 2 --step-size 128 --step-zero 2 --fused 2>&1 | grep -E "^\(a\)"
