# Steps 6-7: distillation of a student re-initialised from its theta0, with or without the
# transform, evaluated at the end (result.json holds top-1/top-5, teacher KL, feature L2).


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule distill:
    input:
        theta0=lambda w: L.theta0(w.ds, w.student, w.seed),
        teacher=lambda w: L.final(w.ds, w.teacher, w.tseed),
        transform=lambda w: P.run_transforms(w.ds, w.teacher, w.tseed, w.student, w.seed, w.transform),
        cached=lambda w: P.run_teacher_outputs(*run_wildcards(w)),
        data=lambda w: data_input(w.ds),
    output:
        result=RUN_FILE.format(file="result.json"),
        final=RUN_FILE.format(file="final.pt"),
    log:
        log_path("{ds}", "runs", "{teacher}-s{tseed}__{student}", "{method}", "{transform}", "s{seed}"),
    resources:
        tracking=TRACKING_URI,  # not a rerun trigger (as params would be)
        tags=run_tags(lambda w: L.run_file(*run_wildcards(w))),
        run_options=runtime_fields(lambda w: P.distill_spec(*run_wildcards(w))),
        launch=lambda w: launch("distill", f"distill-{w.ds}-{w.student}-{w.method}-{w.transform}-s{w.seed}", w.ds),
        gpus=gpus("distill"),
    params:
        spec=result_fields(lambda w: P.distill_spec(*run_wildcards(w))),
    shell:
        "{resources.launch} distill --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {resources.tracking:q} --tags {resources.tags:q} --job-log {log:q} "
        "> {log:q} 2>&1"
