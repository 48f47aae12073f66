{{/*
Names. Resource names stay short because the controller's Job name becomes a label value (63 characters)
and the run Jobs are named <kubernetes.name>-<pipeline id>-<run key>.
*/}}
{{- define "nexlify-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "nexlify-train.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nexlify-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels; pass (dict "ctx" $ "component" "controller"). */}}
{{- define "nexlify-train.labels" -}}
helm.sh/chart: {{ include "nexlify-train.chart" .ctx }}
{{ include "nexlify-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: nexlify-train
{{- end }}

{{- define "nexlify-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nexlify-train.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "nexlify-train.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "nexlify-train.controllerServiceAccountName" -}}
{{- default (printf "%s-controller" (include "nexlify-train.fullname" .)) .Values.controller.serviceAccount.name }}
{{- end }}

{{- define "nexlify-train.workerServiceAccountName" -}}
{{- default (printf "%s-worker" (include "nexlify-train.fullname" .)) .Values.worker.serviceAccount.name }}
{{- end }}

{{- define "nexlify-train.output" -}}
{{- $prefix := trimAll "/" .Values.storage.prefix }}
{{- if $prefix }}
{{- printf "s3://%s/%s" .Values.storage.bucket $prefix }}
{{- else }}
{{- printf "s3://%s" .Values.storage.bucket }}
{{- end }}
{{- end }}

{{/*
The pipeline config without `owner_job` (which is the controller Job's name and so depends on this).
Keys the chart owns (output, executor, kubernetes) are added here; values.schema.json keeps users from
setting them under `pipeline`.
*/}}
{{- define "nexlify-train.pipelineBody" -}}
{{- $w := .Values.worker -}}
{{- $req := $w.resources.requests | default dict -}}
{{- $lim := $w.resources.limits | default dict -}}
{{- /* cpu and memory go to their own settings; every other resource name travels in `resources` */ -}}
{{- $extra := dict -}}
{{- with omit $req "cpu" "memory" }}{{- $_ := set $extra "requests" . }}{{- end }}
{{- with omit $lim "cpu" "memory" }}{{- $_ := set $extra "limits" . }}{{- end }}
{{- $k8s := dict
  "namespace" .Release.Namespace
  "name" (include "nexlify-train.fullname" .)
  "image" (include "nexlify-train.image" .)
  "image_pull_policy" .Values.image.pullPolicy
  "worker_service_account" (include "nexlify-train.workerServiceAccountName" .)
  "s3_secret" .Values.storage.existingSecret
  "s3_endpoint" .Values.storage.endpoint
  "gpus" $w.gpus
  "cpu_request" (get $req "cpu" | toString)
  "memory_request" (get $req "memory" | toString)
  "cpu_limit" (get $lim "cpu" | toString)
  "memory_limit" (get $lim "memory" | toString)
  "resources" $extra
  "pod_security_context" $w.podSecurityContext
  "container_security_context" $w.securityContext
  "pod_annotations" $w.podAnnotations
  "pod_labels" $w.podLabels
  "node_selector" $w.nodeSelector
  "tolerations" $w.tolerations
  "affinity" $w.affinity
  "priority_class_name" $w.priorityClassName
  "kueue_queue" .Values.kueue.queueName
  "backoff_limit" $w.backoffLimit
  "active_deadline_seconds" $w.activeDeadlineSeconds
  "ttl_seconds_after_finished" $w.ttlSecondsAfterFinished
-}}
{{- $cfg := merge (dict "output" (include "nexlify-train.output" .) "executor" "kubernetes" "kubernetes" $k8s) (deepCopy .Values.pipeline) -}}
{{- toYaml $cfg }}
{{- end }}

{{/*
Short hash of everything the controller pod runs with: the pipeline config and the controller's pod
settings. It names the controller Job and the ConfigMap, so a changed config starts a new pipeline run
(a new Job) and an unchanged one leaves the existing Job alone. Job templates are immutable, so a change
to the controller's pod settings also needs a new name.
*/}}
{{- define "nexlify-train.configHash" -}}
{{- $pod := dict "image" .Values.image "controller" (omit .Values.controller "serviceAccount") "storage" .Values.storage
  "podSecurityContext" .Values.podSecurityContext "securityContext" .Values.securityContext
  "tmpSizeLimit" .Values.tmpSizeLimit "argocd" .Values.gitops.argocd -}}
{{- printf "%s\n%s" (include "nexlify-train.pipelineBody" .) (toJson $pod) | sha256sum | trunc 8 }}
{{- end }}

{{/* Name of the one-off controller Job (and of the ConfigMap it reads). */}}
{{- define "nexlify-train.controllerJobName" -}}
{{- printf "%s-%s" (include "nexlify-train.fullname" .) (include "nexlify-train.configHash" .) }}
{{- end }}

{{- define "nexlify-train.configMapName" -}}
{{- printf "%s-%s" (include "nexlify-train.fullname" .) (include "nexlify-train.configHash" .) }}
{{- end }}

{{/* pipeline.yaml: the body plus owner_job (empty under a CronJob: the controller reads NEXLIFY_OWNER_JOB). */}}
{{- define "nexlify-train.pipelineYaml" -}}
{{- $cfg := fromYaml (include "nexlify-train.pipelineBody" .) -}}
{{- $owner := ternary "" (include "nexlify-train.controllerJobName" .) (ne .Values.schedule "") -}}
{{- $_ := set $cfg.kubernetes "owner_job" $owner -}}
{{- toYaml $cfg }}
{{- end }}

{{/* Environment shared by the controller and the test pod: S3 settings. */}}
{{- define "nexlify-train.s3Env" -}}
{{- with .Values.storage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "nexlify-train.s3EnvFrom" -}}
{{- with .Values.storage.existingSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/* The controller's pod template (shared by the Job and the CronJob). */}}
{{- define "nexlify-train.controllerPodTemplate" -}}
metadata:
  # No chart or app version here: a Job's pod template is immutable, so it holds only what the
  # config hash in the Job's name covers.
  labels:
    {{- include "nexlify-train.selectorLabels" (dict "ctx" . "component" "controller") | nindent 4 }}
    app.kubernetes.io/part-of: nexlify-train
    nexlify.io/config-hash: {{ include "nexlify-train.configHash" . | quote }}
    {{- with .Values.controller.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.controller.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "nexlify-train.controllerServiceAccountName" . }}
  automountServiceAccountToken: true
  restartPolicy: Never
  {{- with .Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with .Values.controller.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.controller.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.controller.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.controller.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: controller
      image: {{ include "nexlify-train.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - train
        - --executor
        - kubernetes
        - --config
        - /etc/nexlify/pipeline.yaml
        - --automated
        {{- if .Values.controller.force }}
        - --force
        {{- end }}
      env:
        - name: NEXLIFY_LOG_FORMAT
          value: json
        - name: HOME
          value: /tmp
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: POD_UID
          valueFrom:
            fieldRef:
              fieldPath: metadata.uid
        # The Job that owns this pod (name and uid), for ownerReferences on the run Jobs; under a
        # CronJob this is the only place the Job's generated name is known.
        - name: NEXLIFY_OWNER_JOB
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['batch.kubernetes.io/job-name']
        - name: NEXLIFY_OWNER_JOB_UID
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['batch.kubernetes.io/controller-uid']
        {{- with include "nexlify-train.s3Env" . }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .Values.controller.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with include "nexlify-train.s3EnvFrom" . }}
      {{- . | nindent 6 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/nexlify
          readOnly: true
        - name: tmp
          mountPath: /tmp
      {{- with .Values.controller.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
  volumes:
    - name: config
      configMap:
        name: {{ include "nexlify-train.configMapName" . }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{/* The controller Job's spec (shared by the Job and the CronJob's jobTemplate). */}}
{{- define "nexlify-train.controllerJobSpec" -}}
# One controller pod at a time, and a replacement only once the previous pod has ended: with the lease
# in the output (pipeline.lease), a restarted pod of this Job takes the pipeline over, never two at once.
parallelism: 1
completions: 1
podReplacementPolicy: Failed
backoffLimit: {{ .Values.controller.backoffLimit }}
{{- with .Values.controller.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
ttlSecondsAfterFinished: {{ .Values.controller.ttlSecondsAfterFinished }}
# Bad input (exit code 2) will not get better on retry; a node drain is not the pipeline's fault.
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: controller
        operator: In
        values: [2]
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
template:
  {{- include "nexlify-train.controllerPodTemplate" . | nindent 2 }}
{{- end }}
