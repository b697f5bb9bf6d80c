{{/*
What differs between launchers inside the shared pod template (_pod.tpl), and the pieces the
launcher templates share. The PyTorchJob's operator injects the rendezvous env itself; an
Indexed Job's controller injects only JOB_COMPLETION_INDEX, so the chart sets torchrun's
PET_* variables for it: a c10d rendezvous of exactly job.replicas pods whose store runs in
the index-0 pod (dmdr.launch.run hosts it there), reached through the headless Service.
*/}}

{{/* The headless Service the pods' hostnames live under ("<job>-<index>.<service>"). */}}
{{- define "dmdr.serviceName" -}}
{{- include "dmdr.jobName" . }}
{{- end }}

{{/* "true" when torchrun runs a c10d rendezvous (elastic PyTorchJob, Indexed Job). */}}
{{- define "dmdr.c10d" -}}
{{- if or (include "dmdr.elastic" .) (eq .Values.launcher "indexedjob") }}true{{ end }}
{{- end }}

{{/* elastic.rdzvConf as key/value items (nulls left out), values as PyYAML reads them. */}}
{{- define "dmdr.rdzvConf" -}}
{{- range $key, $value := .Values.elastic.rdzvConf }}
{{- if not (kindIs "invalid" $value) }}
- key: {{ $key }}
  value: {{ include "dmdr.configValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Env the launcher's controller does not inject: torchrun's rendezvous settings. */}}
{{- define "dmdr.launcherEnv" -}}
{{- $v := .Values }}
{{- if eq $v.launcher "indexedjob" }}
{{- $job := include "dmdr.jobName" . }}
- name: PYTHONUNBUFFERED
  value: "1"
- name: PET_NNODES
  value: {{ $v.job.replicas | quote }}
- name: PET_NPROC_PER_NODE
  value: {{ include "dmdr.procsPerPod" . | quote }}
- name: PET_RDZV_BACKEND
  value: c10d
- name: PET_RDZV_ENDPOINT
  value: {{ printf "%s-0.%s:%d" $job (include "dmdr.serviceName" .) (int $v.distributed.port) | quote }}
- name: PET_RDZV_ID
  value: {{ $job | quote }}
- name: PET_MAX_RESTARTS
  value: {{ $v.elastic.maxRestarts | quote }}
{{- with include "dmdr.rdzvConf" . | fromYamlArray }}
- name: PET_RDZV_CONF
  value: {{ $items := list }}{{ range . }}{{ $items = append $items (printf "%s=%s" .key .value) }}{{ end }}{{ join "," $items | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod spec fields of the launcher: an Indexed Job's pods are never restarted in place
     (podFailurePolicy needs restartPolicy Never) and live under the headless Service. */}}
{{- define "dmdr.launcherPodSpec" -}}
{{- if eq .Values.launcher "indexedjob" }}
restartPolicy: Never
subdomain: {{ include "dmdr.serviceName" . }}
{{- end }}
{{- end }}
