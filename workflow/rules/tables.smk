# Step 8: the paper's tables from the runs' results, beside the paper's numbers, and the page
# that gathers them.


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule table:
    input:
        lambda w: P.plan_inputs(table_plan(w.n)),
    output:
        csv=L.table("{n}", "csv"),
        md=L.table("{n}", "md"),
        tex=L.table("{n}", "tex"),
        html=report(L.table("{n}", "html"), caption="../report/table.rst",
                    category="Table {n}", labels={"table": "{n}", "format": "rendered"}),
    log:
        log_path("tables", "table{n}"),
    resources:
        kcd=KCD,
    params:
        plan=lambda w: json.dumps(table_plan(w.n)),
        prefix=lambda w: L.table(w.n, "csv").removesuffix(".csv"),
    shell:
        "{resources.kcd} table --plan {params.plan:q} --out {params.prefix:q} > {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule tables_md:
    input:
        P.gathered_parts(),
    output:
        f"{RESULTS}/tables.md",
    log:
        log_path("tables", "tables_md"),
    resources:
        kcd=KCD,
    shell:
        "{resources.kcd} tables-md --out {output:q} {input:q} > {log:q} 2>&1"
