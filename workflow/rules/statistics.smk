# Step 4: consistency statistics of a trained teacher/student pair over the training images.


rule statistics:
    input:
        teacher=lambda w: f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        student=lambda w: f"{model_dir(w.ds, w.student, w.seed)}/final.pt",
        data=lambda w: data_input(w.ds),
    output:
        f"{RESULTS}/{{ds}}/stats/{{teacher}}-s{{tseed}}__{{student}}-s{{seed}}.pt",
    log:
        log_path("{ds}", "statistics", "{teacher}-s{tseed}__{student}-s{seed}"),
    resources:
        launch=lambda w: launch("statistics", f"stats-{w.ds}-{w.teacher}-{w.student}-s{w.seed}", w.ds),
        gpus=lambda w: resources_of("statistics", w.ds).get("gpus", 0),
    params:
        spec=stats_spec,
    shell:
        "{resources.launch} statistics --spec {params.spec:q} > {log} 2>&1"
