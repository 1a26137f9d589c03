"""kubetune's user-side command line (`kubetune`): what an ML engineer runs on a laptop against a cluster.
Installs without torch (`pip install 'kubetune[client]'`); `kubetune run` and `kubetune tiny` hand over to the
trainer when it is installed (`pip install 'kubetune[trainer]'`). Modules: `app` (parser, dispatch), `kube`
(kubeconfig and API reads), `follow` (watch a job), `plot` (draw its curves)."""
