# Step 0: the demo datasets, generated in the real on-disk formats (demo scale only).


rule demo_data:
    output:
        f"{DEMO}/{{folder}}/.kcd-demo.json",
    log:
        log_path("data", "demo-{folder}"),
    params:
        kind=lambda w: {v: k for k, v in DEMO_FOLDERS.items()}[w.folder],
        seed=config.get("demo_data", {}).get("seed", 0),
        size="--tiny" if config.get("demo_data", {}).get("size") == "tiny" else "",
    shell:
        "{KCD} demo-data --root {DEMO:q} --seed {params.seed} --kinds {params.kind} {params.size} "
        "-q > {log:q} 2>&1"
