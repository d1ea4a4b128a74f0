{{/*
Names, labels and the pieces several templates share.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else the release name with the chart
name appended unless the release name already contains it. 52 characters at most, so
suffixes such as "-aggregate-edit" keep names within 63.
*/}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels every resource of the release carries. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The labels that select the operator pod (never change them: Deployment selectors are immutable). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator settings file (OperatorSettings, camelCase): the values under `settings`, with
the chart's trainer image when none is set and optional keys left empty ("") left out, so
the operator applies its own defaults and refuses anything it does not know.
*/}}
{{- define "kubetune.settings" -}}
{{- $settings := deepCopy .Values.settings }}
{{- if not $settings.trainerImage }}
{{- $_ := set $settings "trainerImage" (printf "ghcr.io/kubetune/kubetune-trainer:%s" .Chart.AppVersion) }}
{{- end }}
{{- range $key, $value := .Values.settings }}
{{- if and (kindIs "string" $value) (eq $value "") (ne $key "trainerImage") }}
{{- $_ := unset $settings $key }}
{{- end }}
{{- end }}
{{- toYaml $settings }}
{{- end }}

{{/*
The operator's permissions in the namespaces it watches. The same rules go into the
ClusterRole (whole cluster) or into one Role per watched namespace. docs/install.md has the
same table; tests/chart/test_rbac.py keeps both, and the operator's code, in step.
*/}}
{{- define "kubetune.operatorRules" -}}
# FineTuneJobs: watched; finalizers patched (output.deletePolicy: Delete).
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [list, watch, patch]
# ModelDeployments: watched; read once before their first children are created.
- apiGroups: [kubetune.io]
  resources: [modeldeployments]
  verbs: [get, list, watch]
# Their status: written by the operator only.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, modeldeployments/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which needs this where the
# OwnerReferencesPermissionEnforcement admission plugin is on (e.g. OpenShift).
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers, modeldeployments/finalizers]
  verbs: [update]
# Training Jobs: watched; created per run; patched in place (suspend, TTL, deadline);
# deleted when a new run supersedes them.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# Pods: training and serving pods watched (progress, results, readiness); the artifact
# cleanup pod created, and deleted to retry it.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete]
# The run's TrainerConfig ConfigMap; the scratch claim of a run and the model-cache claim of a
# ModelDeployment: created once, owned by their FineTuneJob or ModelDeployment.
- apiGroups: [""]
  resources: [configmaps, persistentvolumeclaims]
  verbs: [create]
# Services: the headless Service of multi-node jobs; each ModelDeployment's Service (kept
# in step with its spec).
- apiGroups: [""]
  resources: [services]
  verbs: [create, patch]
# Secrets: read by name to tell which Secret or key a job is waiting for (pods get the
# values as secretKeyRef, never through the operator).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Events on FineTuneJobs and ModelDeployments (stage changes, readiness, failures, retries).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# ModelDeployment: the vLLM Deployment, watched, created, and replaced when what it serves
# changes.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, update]
# ModelDeployment: its PodDisruptionBudget.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [create, patch]
# ModelDeployment: its autoscaler (an HPA or a KEDA ScaledObject, deleted when the spec
# switches to the other or to fixed replicas) and its ServiceMonitor. Rules for API groups
# that are not installed are harmless.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [create, patch, delete]
{{- end }}

{{/*
kopf's cluster-scoped reads: CustomResourceDefinitions (to notice CRDs installed or removed
while it runs) and, when it watches a list of namespaces, Namespaces (to notice them come
and go).
*/}}
{{- define "kubetune.observationRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.settings.watchNamespaces }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}
