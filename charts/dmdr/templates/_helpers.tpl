{{/*
Names. Kubernetes names are DNS labels: at most 63 characters.
*/}}
{{- define "dmdr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dmdr.fullname" -}}
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

{{/*
The PyTorchJob name. The operator names a Service and a pod "<job>-worker-<index>" after it,
which must stay a 63-character DNS label: 63 - len("-worker-") - 3 index digits = 52.
*/}}
{{- define "dmdr.jobName" -}}
{{- include "dmdr.fullname" . | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "dmdr.configMapName" -}}
{{- printf "%s-config" (include "dmdr.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "dmdr.cacheClaimName" -}}
{{- if .Values.storage.cache.existingClaim }}
{{- .Values.storage.cache.existingClaim }}
{{- else }}
{{- printf "%s-cache" (include "dmdr.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "dmdr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dmdr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dmdr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels for every object. */}}
{{- define "dmdr.labels" -}}
helm.sh/chart: {{ include "dmdr.chart" . }}
{{ include "dmdr.selectorLabels" . }}
app.kubernetes.io/version: {{ include "dmdr.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: training
app.kubernetes.io/part-of: dmdr
{{- end }}

{{- define "dmdr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dmdr.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dmdr.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "dmdr.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "dmdr.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "dmdr.expName" -}}
{{- default .Release.Name .Values.training.expName }}
{{- end }}

{{/* Processes torchrun starts in each pod: one per GPU, or distributed.procsPerPod on CPUs. */}}
{{- define "dmdr.procsPerPod" -}}
{{- if gt (int .Values.resources.gpusPerPod) 0 }}
{{- .Values.resources.gpusPerPod }}
{{- else }}
{{- default 1 .Values.distributed.procsPerPod }}
{{- end }}
{{- end }}

{{/* "true" for an elastic PyTorchJob (the other launchers' rendezvous is static). */}}
{{- define "dmdr.elastic" -}}
{{- if and .Values.elastic.enabled (eq .Values.launcher "pytorchjob") }}true{{ end }}
{{- end }}

{{/* "true" when checkpoints outlive the pod: S3 or an existing PVC for the outputs. */}}
{{- define "dmdr.durableOutputs" -}}
{{- if or .Values.storage.s3.uri .Values.storage.outputs.existingClaim }}true{{ end }}
{{- end }}

{{/* Env var names that hold credentials and so must come from a Secret. */}}
{{- define "dmdr.credentialPattern" -}}
(?i)((^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|APIKEY)(_|$)|ACCESS_KEY|SECRET_KEY|API_KEY|PRIVATE_KEY)
{{- end }}

{{/*
One value of the trainer config as a YAML scalar or flow list that PyYAML reads back with the
same type: strings JSON-quoted ("no" stays a string), whole numbers without an exponent
(Helm turns every number into a float64, so toYaml would write 1e+06), and other floats with
a mantissa dot (PyYAML reads "1e-07" as a string, "1.0e-07" as a float).
*/}}
{{- define "dmdr.configValue" -}}
{{- if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "dmdr.configValue" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "invalid" . }}null
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "string" . }}{{ toJson . }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}{{ printf "%d" (int64 .) }}
{{- else if and (kindIs "float64" .) (eq (float64 .) (float64 (int64 .))) }}{{ printf "%d" (int64 .) }}
{{- else }}{{ regexReplaceAll "^(-?[0-9]+)e" (printf "%g" (float64 .)) "${1}.0e" }}
{{- end }}
{{- end }}

{{/*
The stop after SIGTERM, inside job.terminationGracePeriodSeconds (T): torchrun SIGKILLs its
workers at T-10 s (10 s left for it to exit before the kubelet's SIGKILL), and the trainer
finishes its step, saves (checkpoint_on_sigterm) and flushes uploads within shutdown_grace,
at most T-20 s (its default here), counted from the signal.
*/}}
{{- define "dmdr.shutdownTimeout" -}}
{{- default (sub (int .Values.job.terminationGracePeriodSeconds) 10) .Values.torchrun.shutdownTimeout }}
{{- end }}
{{- define "dmdr.maxShutdownGrace" -}}
{{- sub (include "dmdr.shutdownTimeout" . | int) 10 }}
{{- end }}

{{/* "true" when the pods talk to S3: the run's store, or an s3:// training.initCkpt. */}}
{{- define "dmdr.usesS3" -}}
{{- if or .Values.storage.s3.uri (hasPrefix "s3://" .Values.training.initCkpt) }}true{{ end }}
{{- end }}

{{/* Pod schedulerName: gangScheduling.schedulerName while gang scheduling is on, else schedulerName. */}}
{{- define "dmdr.schedulerName" -}}
{{- if and .Values.gangScheduling.enabled .Values.gangScheduling.schedulerName }}
{{- .Values.gangScheduling.schedulerName }}
{{- else }}
{{- .Values.schedulerName }}
{{- end }}
{{- end }}

{{/* Labels and annotations of the job object (any launcher): job.labels under the chart's
     own labels (which win on a clash) and Kueue's. */}}
{{- define "dmdr.jobLabels" -}}
{{- $own := include "dmdr.labels" . | fromYaml }}
{{- include "dmdr.labels" . }}
{{- with .Values.kueue.queueName }}
{{- $_ := set $own "kueue.x-k8s.io/queue-name" . }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .Values.kueue.priorityClass }}
{{- $_ := set $own "kueue.x-k8s.io/priority-class" . }}
kueue.x-k8s.io/priority-class: {{ . }}
{{- end }}
{{- range $key, $value := .Values.job.labels }}
{{- if not (hasKey $own $key) }}
{{ $key }}: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- define "dmdr.jobAnnotations" -}}
{{- with .Values.job.annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
A Kubernetes quantity ("64Gi", "1.5G", "500M", "1e9", 2147483648) in bytes, as a float64
printed with %f: binary (Ki..Ei) and decimal (k..E, m) suffixes and exponents.
*/}}
{{- define "dmdr.bytes" -}}
{{- $q := toString . }}
{{- $units := dict "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "m" 1e-3 }}
{{- $suffix := regexFind "([KMGTPE]i|[kMGTPEm])$" $q }}
{{- $number := trimSuffix $suffix $q }}
{{- $scale := 1.0 }}
{{- with $suffix }}{{ $scale = get $units . }}{{ end }}
{{- if regexMatch "[eE]" $number }}
{{- $parts := regexSplit "[eE]" $number 2 }}
{{- $number = index $parts 0 }}
{{- /* "+09" as Helm prints 1e9: no sign, no leading zeros (they would read as octal) */}}
{{- $exp := regexReplaceAll "^\\+?0*" (index $parts 1) "" }}
{{- range until ($exp | default "0" | int) }}{{ $scale = mulf $scale 10 }}{{ end }}
{{- end }}
{{- printf "%f" (mulf (float64 $number) $scale) }}
{{- end }}

{{/* A container that cannot gain privileges, on a read-only root; (dict "add" LIST) adds
     capabilities (e.g. IPC_LOCK for RDMA) to an otherwise empty set. */}}
{{- define "dmdr.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
  {{- with .add }}
  add:
    {{- toYaml . | nindent 4 }}
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The optional eval Job (eval.enabled). */}}
{{- define "dmdr.evalJobName" -}}
{{- printf "%s-eval" (include "dmdr.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}
