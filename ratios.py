
# CPU by role (generation thread, MainThread, native = MLX compute, rest = HTTP handler threads)
roles = defaultdict(list)
for run in d["runs"]:
    if len(run) > 7 and run[7]:
        roles[(run[0], run[1], run[2])].append(run[7])
if roles:
    print("\n| config | mode | gen thread | MainThread | native (MLX) | handlers/rest | total CPU us/tok |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for stream in (False, True):
        for kind in ("once", "sustained"):
            for c in configs:
                xs = roles.get((c, stream, kind))
                if not xs:
                    continue
                m = {k: statistics.median(x[k] for x in xs) for k in xs[0]}
                tot = statistics.median(sum(x.values()) for x in xs)
                print(f"| {c} | {'streamed' if stream else 'non-streamed'} {kind} | {m['gen']:.0f} | {m['main']:.0f} | "
                      f"{m['native']:.0f} | {m['rest']:.0f} | {tot:.0f} |")
