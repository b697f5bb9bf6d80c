{{/*
What differs between launchers inside the shared pod template (_pod.tpl), and the pieces the
launcher templates share. The PyTorchJob's operator injects the rendezvous env itself; an
Indexed Job's controller injects only JOB_COMPLETION_INDEX, and JobSet nothing, so the chart
sets torchrun's PET_* variables for them: indexedjob, a c10d rendezvous of exactly
job.replicas pods whose store runs in the index-0 pod (dmdr.launch.run hosts it there),
reached through the headless Service; jobset, a static rendezvous (the set restarts as one).
*/}}

{{/* The headless Service the pods' hostnames live under ("<job>-<index>.<service>"). */}}
{{- define "dmdr.serviceName" -}}
{{- include "dmdr.jobName" . }}
{{- end }}

{{/* "true" when torchrun runs a c10d rendezvous (elastic PyTorchJob, Indexed Job). */}}
{{- define "dmdr.c10d" -}}
{{- if or (include "dmdr.elastic" .) (eq .Values.launcher "indexedjob") }}true{{ end }}
{{- end }}

{{/*
The JobSet and its one replicated job "node": pods "<jobset>-node-0-<index>" under the
subdomain <jobset>, so the name is cut to leave room for "-node-0-" and 4 index digits.
*/}}
{{- define "dmdr.jobsetName" -}}
{{- include "dmdr.jobName" . | trunc 51 | trimSuffix "-" }}
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
{{- else if eq $v.launcher "jobset" }}
{{- /* The whole set restarts together, so a static rendezvous: node rank = the pod's
       completion index, the store on index 0; no worker-group restarts inside a pod (a
       static rendezvous cannot re-form without the lost peer: the pod fails, the set restarts). */}}
{{- $js := include "dmdr.jobsetName" . }}
- name: PYTHONUNBUFFERED
  value: "1"
- name: PET_NNODES
  value: {{ $v.job.replicas | quote }}
- name: PET_NPROC_PER_NODE
  value: {{ include "dmdr.procsPerPod" . | quote }}
- name: PET_NODE_RANK
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
- name: PET_MASTER_ADDR
  value: {{ printf "%s-node-0-0.%s" $js $js | quote }}
- name: PET_MASTER_PORT
  value: {{ $v.distributed.port | quote }}
- name: PET_MAX_RESTARTS
  value: "0"
{{- end }}
{{- end }}

{{/* Pod spec fields of the launcher: an Indexed Job's pods are never restarted in place
     (podFailurePolicy needs restartPolicy Never) and live under the headless Service. */}}
{{- define "dmdr.launcherPodSpec" -}}
{{- if eq .Values.launcher "indexedjob" }}
restartPolicy: Never
subdomain: {{ include "dmdr.serviceName" . }}
{{- else if eq .Values.launcher "jobset" }}
restartPolicy: Never
{{- end }}
{{- end }}

{{/*
Whole-set restarts of a JobSet of one Indexed Job (launcher jobset, and trainjob's
TrainingRuntime): the set's failurePolicy (context: the maxRestarts), and the child Job's spec
fields (context: the trainer container's name) by which one failed pod fails its Job, exit 2
(a bad config) with reason PodFailurePolicy, which fails the set at once.
*/}}
{{- define "dmdr.jobsetFailurePolicy" -}}
maxRestarts: {{ . }}
restartStrategy: BlockingRecreate
rules:
  - name: FailOnBadConfig
    action: FailJobSet
    onJobFailureReasons:
      - PodFailurePolicy
{{- end }}

{{- define "dmdr.failFastJob" -}}
backoffLimit: 0
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: {{ . }}
        operator: In
        values:
          - 2
{{- end }}
