# Steps 6-7: distillation of a student re-initialised from its theta0, with or without the
# transform, evaluated at the end (result.json holds top-1/top-5, teacher KL, feature L2).


rule distill:
    input:
        theta0=lambda w: theta0_path(w.ds, w.student, w.seed),
        teacher=lambda w: f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        transform=distill_transform,
        data=lambda w: data_input(w.ds),
    output:
        result=f"{RESULTS}/{{ds}}/runs/{{teacher}}-s{{tseed}}__{{student}}/{{method}}/{{transform}}/s{{seed}}/result.json",
        final=f"{RESULTS}/{{ds}}/runs/{{teacher}}-s{{tseed}}__{{student}}/{{method}}/{{transform}}/s{{seed}}/final.pt",
    wildcard_constraints:
        ds=CLASSIFICATION_DATASETS,
    log:
        log_path("{ds}", "runs", "{teacher}-s{tseed}__{student}", "{method}", "{transform}", "s{seed}"),
    resources:
        run_options=runtime_fields(distill_spec),
        launch=lambda w: launch("distill", f"distill-{w.ds}-{w.student}-{w.method}-{w.transform}-s{w.seed}", w.ds),
        gpus=lambda w: resources_of("distill", w.ds).get("gpus", 0),
    params:
        spec=result_fields(distill_spec),
    shell:
        "{resources.launch} distill --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {TRACKING_URI:q} "
        "> {log} 2>&1"
