# Step 0: the demo datasets, generated in the real on-disk formats (demo scale only).


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule demo_data:
    output:
        f"{P.demo_root}/{{folder}}/.kcd-demo.json",
    log:
        log_path("data", "demo-{folder}"),
    resources:
        kcd=KCD,
    params:
        args=lambda w: shlex.join(P.demo_args(w.folder)),
    shell:
        "{resources.kcd} demo-data {params.args} -q > {log:q} 2>&1"


# An image-folder split decoded once (kcd/data/decoded.py): with the fast loader on and no
# training augmentation, every job reads the split from this file instead of the images.
rule decode:
    input:
        lambda w: data_input(w.ds, decoded=False),
    output:
        f"{L.decoded('{ds}')}/{{split}}.pt",
    log:
        log_path("{ds}", "data", "decode-{split}"),
    resources:
        kcd=KCD,
    params:
        spec=lambda w: json.dumps(P.decode_spec(w.ds, w.split), sort_keys=True),
    shell:
        "{resources.kcd} decode --spec {params.spec:q} -q > {log:q} 2>&1"
