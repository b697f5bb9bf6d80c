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
{{- sub (int .Values.job.terminationGracePeriodSeconds) 10 }}
{{- end }}
{{- define "dmdr.maxShutdownGrace" -}}
{{- sub (int .Values.job.terminationGracePeriodSeconds) 20 }}
{{- end }}
