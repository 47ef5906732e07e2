"""A Lithops program, unchanged but for its import, on a dask-lithops cluster.

    python examples/lithops_program.py            # LocalhostExecutor's cluster (local processes)

Writes a few text objects to localhost storage, counts their lines in partitions
(map_reduce over `localhost://bucket/prefix/`), then runs a plain map and a call that fails.
"""

import dask_lithops as lithops  # was: import lithops
from dask_lithops.wait import ANY_COMPLETED


def count_lines(obj):
    return sum(1 for _ in obj.data_stream)


def square(x):
    return x * x


def fails(x):
    raise ValueError(f"cannot handle {x}")


def main():
    with lithops.LocalhostExecutor(dashboard_address=None) as fexec:
        storage = fexec.storage
        for i in range(3):
            storage.put_object("example", f"texts/t{i}.txt",
                               "".join(f"line {n}\n" for n in range(10_000 * (i + 1))))

        fs = fexec.map_reduce(count_lines, "localhost://example/texts/", sum, obj_chunk_size=64 * 1024)
        print("partitions:", len(fs) - 1, " lines:", fexec.get_result(fs))

        fs = fexec.map(square, range(100))
        done, pending = fexec.wait(fs, return_when=ANY_COMPLETED)
        print(f"after ANY_COMPLETED: {len(done)} done, {len(pending)} pending")
        print("sum of squares:", sum(fexec.get_result(fs)))

        try:
            fexec.get_result(fexec.map(fails, ["x"]))
        except ValueError as e:
            print("the call's exception, re-raised here:", repr(e))

        storage.delete_objects("example", storage.list_keys("example", "texts/"))


if __name__ == "__main__":
    main()
