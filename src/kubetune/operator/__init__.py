"""The kubetune operator: reconciles FineTuneJobs and ModelDeployments (DESIGN §4, §8).

Layout, from the inside out:

- `settings`: the platform team's choices (images, GPU classes, defaults), loaded once from
  the file Helm mounts.
- `names`: child names, labels and annotations; the vocabulary shared by the builders, the
  handlers and anyone running `kubectl get -l`.
- `sizing`: `resources.gpus: Auto` and the SIGTERM grace period, from `kubetune.calc`.
- `pod`: the trainer pod (security context, volumes, credentials as Secret references).
- `children`: the objects a FineTuneJob owns (ConfigMap, Job or Indexed Job, headless
  Service, scratch claim) and the artifact cleanup pod.

The builders are pure: a FineTuneJob and the settings in, plain dicts out. They never call
the Kubernetes API and never import torch, so they are table-tested in milliseconds.
"""
