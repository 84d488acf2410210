{{/* Chart name, truncated to a DNS label. */}}
{{- define "qto.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name, else release-chart. */}}
{{- define "qto.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qto.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qto.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "qto.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "qto.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qwen-training-operator
{{- end }}

{{- define "qto.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qto.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "qto.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces the operator watches; empty for cluster scope. One per line. */}}
{{- define "qto.watchedNamespaces" -}}
{{- if eq .Values.watch.scope "namespace" }}
{{- .Release.Namespace }}
{{- else if eq .Values.watch.scope "namespaces" }}
{{- join "\n" .Values.watch.namespaces }}
{{- end }}
{{- end }}

{{/* Namespaces that get the trainer ServiceAccount and its Role. One per line. */}}
{{- define "qto.trainerNamespaces" -}}
{{- $ns := list }}
{{- if .Values.trainer.serviceAccount.namespaces }}
{{- $ns = .Values.trainer.serviceAccount.namespaces }}
{{- else if eq .Values.watch.scope "cluster" }}
{{- $ns = list .Release.Namespace }}
{{- else }}
{{- $ns = splitList "\n" (include "qto.watchedNamespaces" .) }}
{{- end }}
{{- join "\n" (uniq $ns) }}
{{- end }}

{{- define "qto.peering" -}}
{{- gt (int .Values.replicas) 1 | ternary "true" "" }}
{{- end }}

{{- define "qto.peeringName" -}}
{{- default (include "qto.fullname" .) .Values.operator.peering.name }}
{{- end }}

{{/*
The operator's rules (see docs/operator.md): kopf lists, watches and patches the QwenTrainingJobs
(progress and diff-base annotations) and patches their status; the handlers read a job, write its
status, create and read the ConfigMap and the PyTorchJob, patch the PyTorchJob's runPolicy.suspend,
follow PyTorchJobs through a watch, read Kueue's Workloads of their children, and post Events.
*/}}
{{- define "qto.operatorRules" -}}
- apiGroups: ["training.qwen.dev"]
  resources: ["qwentrainingjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["training.qwen.dev"]
  resources: ["qwentrainingjobs/status"]
  verbs: ["patch"]
{{- if eq .Values.jobApi "trainjob" }}
# Kubeflow Trainer v2: create/read/watch TrainJobs, patch their suspend flag; read the JobSet behind one
# (restarts). The ClusterTrainingRuntime is resolved by the Trainer, not read by the operator.
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["get"]
{{- else }}
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
# Failed pods' exit codes and termination messages, restarts; the trainer ServiceAccount's presence.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kueue: the Workloads of queued children say why a job waits (the Queued condition); read only.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* kopf peering keep-alives: watch the peering objects and patch our entry into their status. */}}
{{- define "qto.peeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["list", "watch", "patch"]
{{- end }}

{{- define "qto.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "qto.podSecurityContext" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- with .Values.podSecurityContext }}
{{- if .runAsUser }}
runAsUser: {{ .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ .fsGroup }}
{{- end }}
{{- end }}
{{- end }}
