{{/*
Kubeflow Trainer v2 (launcher=trainjob). The Trainer names the JobSet after the TrainJob and
JobSet names pods "<trainjob>-node-0-<index>-<5 random>", which its webhook holds to 63
characters: 63 - len("-node-0-") - 3 index digits - 6 = 46.
*/}}
{{- define "dmdr.trainJobName" -}}
{{- include "dmdr.fullname" . | trunc 46 | trimSuffix "-" }}
{{- end }}

{{/* The shared pod template with the container named "node", as Trainer's torch plugin expects. */}}
{{- define "dmdr.trainJobPod" -}}
{{- include "dmdr.podTemplate" (merge (dict "container" "node") .) }}
{{- end }}

{{/*
What the default runtime (runtimePatches) cannot express, and what runtime.create needs.
*/}}
{{- define "dmdr.validateTrainJob" -}}
{{- $v := .Values }}
{{- with $v.gangScheduling }}
{{- if .enabled }}
{{- if not $v.trainjob.runtime.create }}
{{- fail (printf "gangScheduling with launcher=trainjob is the runtime's podGroupPolicy: set trainjob.runtime.create=true (the chart's runtime then has podGroupPolicy.volcano), or drop it and use a ClusterTrainingRuntime with one (trainjob.runtime.name=%s now)" $v.trainjob.runtime.name) }}
{{- end }}
{{- if ne .schedulerName "volcano" }}
{{- fail "gangScheduling with launcher=trainjob uses Trainer's Volcano plugin: set gangScheduling.schedulerName=volcano" }}
{{- end }}
{{- if and .minAvailable (ne (int .minAvailable) (int $v.job.replicas)) }}
{{- fail "gangScheduling.minAvailable: Trainer's PodGroup always holds every pod of the TrainJob (job.replicas); remove minAvailable" }}
{{- end }}
{{- if or .priorityClass .scheduleTimeoutSeconds }}
{{- fail "gangScheduling.priorityClass / scheduleTimeoutSeconds have no place in Trainer's Volcano PodGroup: remove them (the PodGroup takes the pods' priorityClassName)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if $v.trainjob.runtime.create }}
{{- if not (include "dmdr.durableOutputs" .) }}
{{- fail "trainjob.runtime.create recreates every pod when one fails, which deletes their emptyDir outputs and every checkpoint with them: set storage.s3.uri or storage.outputs.existingClaim" }}
{{- end }}
{{- else }}
{{- range $key := list "priorityClassName" "schedulerName" "runtimeClassName" "hostNetwork" "topologySpreadConstraints" "envFrom" "initContainers" "extraContainers" }}
{{- if get $v $key }}
{{- fail (printf "%s cannot be passed to the ClusterTrainingRuntime %s (TrainJob runtimePatches have no such field): set trainjob.runtime.create=true so the chart renders the runtime, or remove it" $key $v.trainjob.runtime.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
