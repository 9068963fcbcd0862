# A teacher's logits and features on a split, computed once for every run of its pairs
# (config key cache_teacher_outputs): on the evaluation split, read by every run's evaluation;
# on the training split, read instead of a teacher forward per step when the training images
# are not augmented (datasets.<ds>.augment: false).


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule teacher_outputs:
    input:
        teacher=lambda w: L.final(w.ds, w.teacher, w.tseed),
        data=lambda w: data_input(w.ds),
    output:
        L.teacher_outputs("{ds}", "{teacher}", "{tseed}", "{split}"),
    log:
        log_path("{ds}", "teachers", "{teacher}-s{tseed}-{split}"),
    resources:
        run_options=runtime_fields(lambda w: P.teacher_outputs_spec(w.ds, w.teacher, w.tseed, w.split)),
        launch=lambda w: launch("teacher_outputs", f"teacher-outputs-{w.ds}-{w.teacher}-s{w.tseed}-{w.split}", w.ds),
        gpus=gpus("teacher_outputs"),
    params:
        spec=result_fields(lambda w: P.teacher_outputs_spec(w.ds, w.teacher, w.tseed, w.split)),
    shell:
        "{resources.launch} teacher-outputs --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log:q} 2>&1"


# RCO's anchors (the teacher part-way through its pre-training) on the training split, for RCO
# runs on unaugmented images; the last anchor is the teacher itself (rule teacher_outputs).
rule anchor_outputs:
    input:
        # the pre-training that writes the anchor (anchors are not outputs of their own)
        teacher=lambda w: L.final(w.ds, w.teacher, w.tseed),
        data=lambda w: data_input(w.ds),
    output:
        L.anchor_outputs("{ds}", "{teacher}", "{tseed}", "{n}"),
    log:
        log_path("{ds}", "teachers", "{teacher}-s{tseed}-anchor-{n}"),
    resources:
        run_options=runtime_fields(lambda w: P.anchor_outputs_spec(w.ds, w.teacher, w.tseed, w.n)),
        launch=lambda w: launch("anchor_outputs", f"anchor-outputs-{w.ds}-{w.teacher}-s{w.tseed}-{w.n}", w.ds),
        gpus=gpus("anchor_outputs"),
    params:
        spec=result_fields(lambda w: P.anchor_outputs_spec(w.ds, w.teacher, w.tseed, w.n)),
    shell:
        "{resources.launch} teacher-outputs --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log:q} 2>&1"
