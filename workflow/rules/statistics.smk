# Step 4: consistency statistics of a teacher/student pair over the training images. A pair
# names each side's weights by a tag: s<seed> (trained) or s<seed>-init (theta0, Table 4).


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule statistics:
    input:
        teacher=lambda w: L.weights(w.ds, w.teacher, w.tw),
        student=lambda w: L.weights(w.ds, w.student, w.sw),
        data=lambda w: data_input(w.ds),
    output:
        L.stats("{ds}", "{teacher}", "{tw}", "{student}", "{sw}"),
    log:
        log_path("{ds}", "statistics", "{teacher}-{tw}__{student}-{sw}"),
    resources:
        run_options=runtime_fields(lambda w: P.stats_spec(*pair_wildcards(w))),
        launch=lambda w: launch("statistics", f"stats-{w.ds}-{w.teacher}-{w.tw}-{w.student}-{w.sw}", w.ds),
        gpus=gpus("statistics"),
    params:
        spec=result_fields(lambda w: P.stats_spec(*pair_wildcards(w))),
    shell:
        "{resources.launch} statistics --spec {params.spec:q} --runtime {resources.run_options:q} "
        "> {log:q} 2>&1"
