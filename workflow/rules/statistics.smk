# Step 4: consistency statistics of a teacher/student pair over the training images. A pair
# names each side's weights by a tag: s<seed> (trained) or s<seed>-init (theta0, Table 4).


rule statistics:
    input:
        teacher=lambda w: weights_path(w.ds, w.teacher, w.tw),
        student=lambda w: weights_path(w.ds, w.student, w.sw),
        data=lambda w: data_input(w.ds),
    output:
        f"{RESULTS}/{{ds}}/stats/{{teacher}}-{{tw}}__{{student}}-{{sw}}.pt",
    wildcard_constraints:
        ds=CLASSIFICATION_DATASETS,
    log:
        log_path("{ds}", "statistics", "{teacher}-{tw}__{student}-{sw}"),
    resources:
        run_options=runtime_fields(stats_spec),
        launch=lambda w: launch("statistics", f"stats-{w.ds}-{w.teacher}-{w.tw}-{w.student}-{w.sw}", w.ds),
        gpus=lambda w: resources_of("statistics", w.ds).get("gpus", 0),
    params:
        spec=result_fields(stats_spec),
    shell:
        "{resources.launch} statistics --spec {params.spec:q} --runtime {resources.run_options:q} "
        "> {log} 2>&1"
