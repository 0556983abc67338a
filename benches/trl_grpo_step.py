"""The peer side of benches/train_step.rs: TRL's GRPOTrainer on the same model,
prompts, reward and settings, driven one training step at a time.

Protocol (one JSON object per line on stdout; library output goes to stderr):
  -> {"ready": true, "prompt_ids": [[...], ...], "beta_default": .., "threads": N}
  then for each "step" line read on stdin, one full optimizer step runs
  (generation + rewards + reference + loss + backward + AdamW) and
  -> {"step": k, "seconds": s, "min_length": .., "max_length": .., "reward": ..,
      "generate_seconds": .., "cpu_seconds": .., "rss_mb": .., "threads": N}
  after the last step:
  -> {"done": true, "peak_rss_mb": .., "hwm_mb": ..}

Usage: python trl_grpo_step.py MODEL_DIR QUESTIONS_JSON THREADS STEPS SEED NEW GROUP BETA LR RANK ALPHA
RANK 0 is full fine-tuning; a tokenizer without a chat template gets the questions as they are.
"""
import ctypes
import json
import os
import resource
import sys
import tempfile
import time

# Protocol lines go to the real stdout; anything the libraries print goes to stderr.
PROTO = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr


LIBC = ctypes.CDLL("libc.so.6")


def send(obj):
    PROTO.write(json.dumps(obj) + "\n")
    PROTO.flush()


def status_mb(field):
    """A memory line of /proc/self/status (VmHWM: peak RSS, VmRSS: current), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds():
    """User + system CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def digits(completions, **kwargs):
    """The reward of both sides: the fraction of non-whitespace characters that are digits."""
    out = []
    for c in completions:
        text = c[0]["content"] if isinstance(c, list) else c
        chars = [ch for ch in text if not ch.isspace()]
        out.append(sum(ch in "0123456789" for ch in chars) / len(chars) if chars else 0.0)
    return out


def main():
    model_dir, questions_json = sys.argv[1], sys.argv[2]
    threads, steps, seed, new, group = (int(x) for x in sys.argv[3:8])
    beta, lr = float(sys.argv[8]), float(sys.argv[9])
    rank, alpha = int(sys.argv[10]), float(sys.argv[11])

    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    questions = json.load(open(questions_json))
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tok.chat_template:
        prompts = [[{"role": "user", "content": q}] for q in questions]
        # The ids TRL generates from (the same call as GRPOTrainer._tokenize_prompts).
        prompt_ids = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    else:  # a base model (the default model): the question as it is
        prompts = list(questions)
        prompt_ids = [tok(q)["input_ids"] for q in questions]
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])

    args = GRPOConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "tarpo-bench-trl"),
        # one generation batch = one optimizer step: 4 prompts x 8 completions
        per_device_train_batch_size=len(questions) * group,
        gradient_accumulation_steps=1,
        num_generations=group,
        num_iterations=1,
        max_steps=steps,
        max_completion_length=new,
        # exactly `new` tokens: EOS is masked out of sampling until `new` tokens exist
        generation_kwargs={"min_new_tokens": new},
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        use_vllm=False,
        # GRPO loss: sequence mean of token means, group-std-scaled advantages, k3 KL to the adapter-off base
        loss_type="grpo",
        scale_rewards="group",
        beta=beta,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
    )
    # rank 0: full fine-tuning (TRL then keeps a frozen reference copy for the KL)
    peft_config = None if rank == 0 else LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )

    class Stepper(TrainerCallback):
        """Waits for the driver's go before each step and reports the step's wall time after it."""

        def __init__(self):
            self.trainer = None
            self.start = None
            self.generate_seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            line = sys.stdin.readline()
            if line.strip() != "step":
                os._exit(0)  # the driver is gone or done
            self.generate_seconds = 0.0
            self.cpu = cpu_seconds()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self.start
            cpu = cpu_seconds() - self.cpu
            m = self.trainer._metrics["train"]
            # Untimed: hand the freed heap back to the OS so the other side's step has the memory
            # (the two processes take turns on one machine; the driver does the same).
            LIBC.malloc_trim(0)
            send(
                {
                    "step": state.global_step,
                    "seconds": dt,
                    "cpu_seconds": cpu,
                    "min_length": m["completions/min_length"][-1],
                    "max_length": m["completions/max_length"][-1],
                    "reward": m["reward"][-1],
                    "generate_seconds": self.generate_seconds,
                    "rss_mb": status_mb("VmRSS"),
                    "threads": torch.get_num_threads(),
                }
            )

    stepper = Stepper()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=digits,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[stepper],
    )
    stepper.trainer = trainer
    generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):  # for the report only: the share of the step spent in model.generate
        t = time.perf_counter()
        out = generate(*a, **kw)
        stepper.generate_seconds += time.perf_counter() - t
        return out

    trainer._generate_single_turn = timed_generate
    send(
        {
            "ready": True,
            "prompt_ids": prompt_ids,
            "beta_default": GRPOConfig.__dataclass_fields__["beta"].default,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "threads": torch.get_num_threads(),
        }
    )
    trainer.train()
    send(
        {
            "done": True,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "hwm_mb": status_mb("VmHWM"),
        }
    )


if __name__ == "__main__":
    main()
