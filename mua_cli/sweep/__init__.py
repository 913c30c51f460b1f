"""Many trials, one stream per device. Every module in one line, from the top (each imports only those below it):

    preview  `mua sweep --dry-run`: the checks and the plan, nothing run or written
    stream   Sweep: the recipe, its store, what is done, the summary and the listener; run_sweep
    worker   a shared study: its planner (round by round) and `mua worker`
    slots    where trials run: Inline (this thread) or a Pool; `start` picks by device and model size
    pool     Pool: slot threads (GPU) or slot processes (CPU), one queue fed for the whole sweep
    forkserver  the server the CPU's slot processes fork from, started before anything heavy is imported
    trainer  Trainer: one device's workload, loaded once; a unit's run, out of memory never a stored failure
    sizing   how many: slots per device, trials per pass, units; Execution (how to run, not what)
    memory   a trial's GPU memory estimate, and the plan that keeps a pass within it
    plan     Planner: what each group adds once its own trials are in; extra seeds once all have settled
    grid     which LRs: the first round, fill, extension, refinement (pure rules)
    shared   SharedStudy: the store as a queue many processes claim from
    optuna_private  the one use of Optuna's private attributes
    store    TrialStore: the durable trials (Optuna storage; SQLite in the run folder by default)
    urls     storage URLs: the driver, and no password in any message

May import: `train`, `spec`, `accel`, `science`, `errors`.
"""
