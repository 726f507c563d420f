#!/usr/bin/env python3
"""P2-DPO pair generation (OBJECTIVES.md §9.3-9.5), the same as `megatron-po generate-p2`:

    torchrun --nproc_per_node 2 tools/generate_p2_pairs.py --questions Q.jsonl [--out P.jsonl] [--clip CLIP_DIR] \\
        --config C.yaml checkpoint.init_from=RUN/checkpoints data.tokenizer_path=RUN/data/tokenizer.model \\
        parallel.tp=2 parallel.sp=true

Q.jsonl holds {"id", "image", "prompt", "bbox"} per line (images relative to it); the records written load with
`objective.name=p2_dpo data.source=jsonl data.train_path=P.jsonl`. See megatron_po/p2_pairs.py.
"""

import sys

from megatron_po.cli import generate_p2_main

if __name__ == "__main__":
    sys.exit(generate_p2_main())
